// kscope's HTTP server: OpenAI-compatible generation over the continuous-batching engine, with per-request
// interventions and capture (the "kscope" extension field), tokenizer endpoints and Prometheus metrics.
// Nothing below runtime/ knows about HTTP: this layer turns JSON into engine requests and errors into 4xx/5xx.
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include "model/model.hpp"
#include "runtime/engine.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"

namespace httplib {
class Server;
}

namespace kscope {

class JobManager;

struct ServerOptions {
  std::string model_dir, model_name = "kscope";
  std::string api_key;              // bearer token; empty: no auth
  std::string vectors_dir;          // vector files by name ("vector": "french" -> DIR/french.safetensors); /vectors
  std::string stores_dir;           // activation stores /capture may write ("store": "name" -> DIR/name)
  std::string jobs_dir;             // background research jobs (/jobs); empty: no jobs
  int64_t max_batch = 64, max_queue = 256;
  size_t max_body_bytes = 8u << 20;
  double request_timeout_s = 600;
  int threads = 16;                 // HTTP worker threads
};

class KscopeServer {
 public:
  KscopeServer(std::unique_ptr<Model> model, ServerOptions opts);
  ~KscopeServer();
  // Binds host:port (port 0: any free port) and returns the bound port, or -1; then serve() until stop().
  int bind(const std::string& host, int port);
  void serve();
  void stop();

 private:
  void routes();
  std::unique_ptr<Model> model_;
  ServerOptions opts_;
  std::unique_ptr<Tokenizer> tok_;
  ChatFormat chat_ = ChatFormat::deepseek_v3;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<JobManager> jobs_;  // destroyed before the engine and the model: stops its worker first
  std::unique_ptr<httplib::Server> http_;
  std::atomic<int64_t> requests_{0}, errors_{0};
  int port_ = -1;
  std::mutex capture_mu_;  // one /capture at a time (it runs beside the engine)
};

}  // namespace kscope
