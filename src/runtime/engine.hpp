// Continuous batching: a scheduler thread runs one forward step at a time over every active request; requests
// join (their prompt is prefilled in the same step) and leave between steps. Each request carries its own
// sampling, stops, interventions and capture, so rows with different experiments share every forward pass.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "interp/capture.hpp"
#include "interp/intervention.hpp"
#include "model/model.hpp"
#include "runtime/sampler.hpp"

namespace kscope {

struct TokenEvent {
  int32_t token;
  float logprob;
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives, most likely first
};

struct EngineResult {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::string finish_reason;  // stop | length | context | cancelled
  int64_t prompt_tokens = 0;
  std::optional<CapturedSeq> capture;
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_new_tokens = 16;
  std::vector<int32_t> stop_tokens;
  bool ignore_eos = false;
  int top_logprobs = 0;
  std::vector<Intervention> interventions;
  SeqLayout layout;                   // prompt_len and chat turns (total_len unused)
  std::optional<CaptureSpec> capture;
  // Called on the engine thread for every kept token; return false to stop the request (finish "cancelled").
  std::function<bool(const TokenEvent&)> on_token;
  std::function<void(EngineResult)> on_done;  // exactly once
};

class QueueFull : public std::runtime_error {
 public:
  QueueFull() : std::runtime_error("the request queue is full") {}
};

struct EngineStats {
  int64_t queued = 0, active = 0, completed = 0, cancelled = 0, generated_tokens = 0, prompt_tokens = 0, steps = 0;
  double busy_seconds = 0;
};

class Engine {
 public:
  Engine(Model& model, int64_t max_batch = 64, int64_t max_queue = 256);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates the request (vocabulary, interventions, capture sites) and queues it; throws Error(input) for bad
  // input and QueueFull when max_queue requests wait. Returns its id.
  uint64_t submit(EngineRequest req);
  void cancel(uint64_t id);  // finishes it as "cancelled" at the next step boundary
  EngineStats stats() const;
  Model& model() { return model_; }

 private:
  struct Live;
  void loop();
  void step(std::vector<std::shared_ptr<Live>>& active);
  void finish(Live& r, const std::string& reason);

  Model& model_;
  const int64_t max_batch_, max_queue_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Live>> queue_;
  std::vector<uint64_t> cancelled_;
  EngineStats stats_;
  uint64_t next_id_ = 1;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace kscope
