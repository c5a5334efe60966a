// Batched generation over ragged sequences: prompts of different lengths share every forward pass with no
// padding, so a sequence's tokens and logits are the same alone or batched.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/model.hpp"
#include "runtime/sampler.hpp"

namespace kscope {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_new_tokens = 16;
  std::vector<int32_t> stop_tokens;  // in addition to the config's eos ids (unless ignore_eos)
  bool ignore_eos = false;
};

enum class FinishReason { stop, length, context };
const char* finish_reason_name(FinishReason r);

struct GenerateResult {
  std::vector<int32_t> tokens;    // generated ids, without the stop token
  std::vector<float> logprobs;    // log p of each generated token (and of the stop token, last, if stopped)
  FinishReason finish = FinishReason::length;
  int32_t stop_token = -1;        // the stop id that ended it, when finish == stop
  int64_t states = 0;             // tokens of the sequence (prompt + kept) whose states went through the model
};

struct GenerateOptions {
  Hook* observer = nullptr;  // hooks (captures, interventions); sequence indices are request indices
  // called after every step with (step, active sequences); for progress bars and streaming
  std::function<void(int64_t, int64_t)> on_step;
  // feed each sequence's last kept token through the model once more at the end, so hooks see the states of
  // every kept token (captures of generated text need this)
  bool feed_last = false;
  // called for every token a sequence keeps (not its stop token), in order: (request index, token)
  std::function<void(int64_t, int32_t)> on_token;
};

std::vector<GenerateResult> generate(Model& model, const std::vector<GenerateRequest>& requests,
                                     const GenerateOptions& opts = {});

}  // namespace kscope
