// Background research jobs for the server (docs/server.md): extraction, steering evaluation, projection and
// massive-activation calibration, run one at a time beside the generation engine on the same loaded model
// (forward passes interleave step by step). Every job lives in DIR/<id>/: job.json (state, progress, result,
// error; rewritten atomically), log.txt, and out/ (the experiment directory the pipeline writes). Jobs survive
// a restart: finished ones are listed again, interrupted or queued ones are queued again and resume from their
// files (the pipeline stages are resumable).
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "model/model.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"

namespace kscope {

// A bad job request: the field and what was expected (the server answers 400, or 404 for an unknown job).
struct JobError : std::runtime_error {
  int status;
  std::string field;
  JobError(int s, std::string f, const std::string& m) : std::runtime_error(m), status(s), field(std::move(f)) {}
};

class JobManager {
 public:
  JobManager(std::string dir, Model& model, const Tokenizer* tok, ChatFormat chat, std::string model_name,
             std::string vectors_dir = "");
  ~JobManager();  // interrupts the running job (it stays resumable) and stops the worker

  // Validates {kind, params} and queues the job; returns its record.
  nlohmann::json submit(const nlohmann::json& request);
  nlohmann::json list() const;
  nlohmann::json get(const std::string& id) const;
  std::string log(const std::string& id) const;
  nlohmann::json cancel(const std::string& id);
  void remove(const std::string& id);  // a finished job and its files (409 while queued or running)
  nlohmann::json files(const std::string& id) const;
  std::string file_path(const std::string& id, const std::string& rel) const;  // checked to stay inside out/
  std::map<std::string, int64_t> counts() const;  // jobs per state

 private:
  struct Job;
  void worker();
  void run(Job& j);
  void save(const Job& j) const;
  void append_log(const Job& j, const std::string& line) const;
  std::shared_ptr<Job> find(const std::string& id) const;

  std::string dir_;
  Model& model_;
  const Tokenizer* tok_;
  ChatFormat chat_;
  std::string model_name_, vectors_dir_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::deque<std::string> queue_;
  std::atomic<bool> shutdown_{false};
  std::thread worker_;
};

}  // namespace kscope
