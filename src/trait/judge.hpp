// Judges: a 0-100 score for a (question, answer) under a rubric, read from the probability of number tokens
// rather than from sampled text. Two implementations with the same rubric and the same scoring rule:
//  - OpenAIJudge: any OpenAI-compatible /chat/completions server (libcurl), one token with top_logprobs;
//  - SelfJudge: the loaded model itself, reading the exact probability of every number token in its vocabulary
//    (no network needed).
// Judgments are cached on disk (JSONL keyed by judge, model and prompt), so a rerun or resumed job asks again
// only for what it has not seen.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "model/model.hpp"
#include "tokenizer/chat.hpp"
#include "tokenizer/tokenizer.hpp"

namespace kscope {

// The rubric prompts. {question}, {answer}, {trait}, {definition} are substituted; a trait dataset may bring its
// own templates with the same fields.
struct Rubric {
  std::string trait_template, coherence_template, on_topic_template;
  static Rubric defaults();
  std::string trait(const std::string& trait, const std::string& definition, const std::string& question,
                    const std::string& answer) const;
  std::string coherence(const std::string& question, const std::string& answer) const;
  std::string on_topic(const std::string& question, const std::string& answer) const;
};
// Substitutes {name} fields; an unknown {field} is an error naming the template.
std::string fill_template(const std::string& tmpl, const std::map<std::string, std::string>& fields, const std::string& where);

struct Judgment {
  std::optional<double> score;  // probability-weighted mean of the integers 0..100; empty: refusal / too little mass
  double mass = 0;              // total probability of integer tokens 0..100
};

// The scoring rule on (token text, probability) candidates: tokens whose text (whitespace trimmed) is an integer
// 0..100 count; score = Σ p·k / Σ p; no score when Σ p < min_mass (the judge refused or answered in words).
Judgment score_from_probs(const std::vector<std::pair<std::string, double>>& cands, double min_mass);
// The integer value of a token text, when it is one in [0, 100] (no sign, no leading zeros).
std::optional<int> number_token_value(const std::string& text);

class JudgeCache {
 public:
  explicit JudgeCache(std::string path = "");  // "" = in memory only
  std::optional<Judgment> get(const std::string& key) const;
  void put(const std::string& key, const Judgment& j);
  size_t size() const;

 private:
  std::string path_;
  mutable std::mutex mu_;
  std::map<std::string, Judgment> map_;
};

class Judge {
 public:
  virtual ~Judge() = default;
  // Scores every prompt (already a full rubric prompt); progress(done, total) as answers arrive.
  std::vector<Judgment> score(const std::vector<std::string>& prompts,
                              const std::function<void(int64_t, int64_t)>& progress = nullptr);
  virtual std::string id() const = 0;  // names judge + model; part of the cache key
  double min_mass = 0.25;
  std::shared_ptr<JudgeCache> cache;
  int64_t asked = 0;  // prompts that were not in the cache

 protected:
  virtual std::vector<Judgment> score_uncached(const std::vector<std::string>& prompts,
                                               const std::function<void(int64_t)>& done_one) = 0;
};

struct OpenAIJudgeOptions {
  std::string base_url;  // e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1
  std::string model;
  std::string api_key;
  int concurrency = 8;
  int max_retries = 5;
  double backoff_s = 0.5;  // first retry delay, doubled each time
  double timeout_s = 120;
  int top_logprobs = 20;
};
// Fills unset fields from KSCOPE_JUDGE_URL / OPENAI_BASE_URL, KSCOPE_JUDGE_MODEL, KSCOPE_JUDGE_KEY / OPENAI_API_KEY.
OpenAIJudgeOptions judge_options_from_env(OpenAIJudgeOptions o);

class OpenAIJudge : public Judge {
 public:
  explicit OpenAIJudge(OpenAIJudgeOptions o);
  std::string id() const override { return "openai:" + o_.base_url + ":" + o_.model; }
  int64_t retries = 0;  // retried requests (429, 5xx, network errors)

 protected:
  std::vector<Judgment> score_uncached(const std::vector<std::string>& prompts,
                                       const std::function<void(int64_t)>& done_one) override;

 private:
  Judgment ask(const std::string& prompt);
  OpenAIJudgeOptions o_;
  std::mutex mu_;
};

class SelfJudge : public Judge {
 public:
  // top_n > 0 reads only the top_n most probable tokens (what an OpenAI server's top_logprobs shows); 0 reads
  // the exact probability of every number token.
  SelfJudge(Model& model, const Tokenizer& tok, ChatFormat chat, std::string model_name, int top_n = 0, int64_t batch = 32);
  std::string id() const override { return "self:" + name_ + (top_n_ ? ":top" + std::to_string(top_n_) : ""); }
  const std::vector<std::pair<int32_t, int>>& number_tokens() const { return numbers_; }

 protected:
  std::vector<Judgment> score_uncached(const std::vector<std::string>& prompts,
                                       const std::function<void(int64_t)>& done_one) override;

 private:
  Model& model_;
  const Tokenizer& tok_;
  ChatFormat chat_;
  std::string name_;
  int top_n_;
  int64_t batch_;
  std::vector<std::pair<int32_t, int>> numbers_;  // (token id, value) of every integer token 0..100
};

}  // namespace kscope
