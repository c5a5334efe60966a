// kscope serve
#include <CLI/CLI.hpp>
#include <csignal>
#include <iostream>

#include "cli.hpp"
#include "commands.hpp"
#include "server/server.hpp"
#include "util/error.hpp"

namespace kscope::cli {

namespace {
KscopeServer* g_server = nullptr;
void on_signal(int) {
  if (g_server) g_server->stop();
}
}  // namespace

void add_serve_command(CLI::App& app, std::vector<std::function<int()>>& runners) {
  static ServerOptions o;
  static std::string host = "127.0.0.1";
  static int port = 8000;
  auto* s = app.add_subcommand("serve", "Serve a model over HTTP: OpenAI-compatible generation with per-request steering and capture");
  s->add_option("MODEL", o.model_dir, "checkpoint directory")->required();
  s->add_option("--host", host, "address to bind")->capture_default_str();
  s->add_option("--port", port, "port (0: any free port, printed)")->capture_default_str();
  s->add_option("--name", o.model_name, "model name clients send in 'model'")->capture_default_str();
  s->add_option("--api-key", o.api_key, "require 'Authorization: Bearer KEY' (also KSCOPE_API_KEY)");
  s->add_option("--vectors", o.vectors_dir, "directory of vector files requests may name (\"vector\": \"french\")");
  s->add_option("--stores", o.stores_dir, "directory POST /capture may write activation stores into (\"store\": \"name\")");
  s->add_option("--jobs", o.jobs_dir, "directory of background research jobs (POST /jobs: extract, steer-eval, project, massive); "
                                      "jobs there survive a restart and interrupted ones resume");
  s->add_option("--max-batch", o.max_batch, "sequences in the running batch")->capture_default_str();
  s->add_option("--max-queue", o.max_queue, "requests waiting for a slot before 429")->capture_default_str();
  s->add_option("--max-body", o.max_body_bytes, "largest request body in bytes (413 past it)")->capture_default_str();
  s->add_option("--timeout", o.request_timeout_s, "seconds a generation may take before it is cancelled (504)")->capture_default_str();
  s->add_option("--threads", o.threads, "HTTP worker threads")->capture_default_str();
  s->footer(
      "Endpoints: POST /v1/chat/completions, /v1/completions (stream, logprobs, top_logprobs, stop, seed, usage), GET /v1/models,\n"
      "POST /tokenize, /detokenize, /apply-template, /capture; GET/POST /vectors, DELETE /vectors/NAME; GET /health, /metrics;\n"
      "GET /traits; POST /jobs, GET /jobs, /jobs/ID, /jobs/ID/log, /jobs/ID/files[/PATH], POST /jobs/ID/cancel, DELETE /jobs/ID.\n"
      "A request's \"kscope\" field adds\n"
      "{\"interventions\": [{\"vector\": name or [floats], \"site\", \"op\", \"coef\", \"relative\", \"positions\"}],\n"
      " \"capture\": {\"sites\": [...], \"positions\": \"response\", \"reduction\": \"mean\"}}; requests with different\n"
      "interventions share the running batch. Example:\n"
      "  kscope serve models/demo --vectors out/demo/french/vectors --jobs out/jobs --port 8000\n"
      "  curl localhost:8000/v1/completions -d '{\"prompt\": \"The file\", \"max_tokens\": 16,\n"
      "    \"kscope\": {\"interventions\": [{\"vector\": \"mean_diff\", \"site\": \"3.resid_post\", \"coef\": 0.5, \"relative\": true}]}}'\n"
      "  curl localhost:8000/jobs -d '{\"kind\": \"extract\", \"params\": {\"trait\": \"french\"}}'");
  runners.push_back([s] {
    if (!*s) return -1;
    if (o.api_key.empty())
      if (const char* k = std::getenv("KSCOPE_API_KEY")) o.api_key = k;
    KscopeServer server(cli::load_model(o.model_dir), o);
    g_server = &server;
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    const int bound = server.bind(host, port);
    if (bound <= 0) fail(ErrorKind::io, host + ":" + std::to_string(port), "cannot bind (in use, or no permission)");
    std::cout << "kscope: serving '" << o.model_name << "' on http://" << host << ":" << bound << std::endl;
    server.serve();
    std::cout << "kscope: stopped" << std::endl;
    return 0;
  });
}

}  // namespace kscope::cli
