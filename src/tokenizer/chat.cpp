#include "tokenizer/chat.hpp"

#include <fstream>

#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;

const char* chat_format_name(ChatFormat f) {
  switch (f) {
    case ChatFormat::kimi_k2: return "kimi-k2";
    case ChatFormat::kimi_k2_thinking: return "kimi-k2-thinking";
    case ChatFormat::deepseek_v3: return "deepseek-v3";
  }
  return "?";
}

ChatFormat parse_chat_format(const std::string& s) {
  if (s == "kimi-k2") return ChatFormat::kimi_k2;
  if (s == "kimi-k2-thinking") return ChatFormat::kimi_k2_thinking;
  if (s == "deepseek-v3") return ChatFormat::deepseek_v3;
  fail(ErrorKind::input, "--chat-format", "'{}' is not a chat format (expected kimi-k2, kimi-k2-thinking or deepseek-v3)", s);
}

ChatFormat default_chat_format(const Tokenizer& tok, const std::string& dir) {
  std::ifstream f(dir + "/tokenizer_config.json");
  if (f) {
    json c = json::parse(f, nullptr, false);
    if (c.is_object()) {
      if (c.contains("kscope_chat_format") && c["kscope_chat_format"].is_string())
        return parse_chat_format(c["kscope_chat_format"].get<std::string>());
      if (tok.kind() == Tokenizer::Kind::tiktoken && c.contains("chat_template") && c["chat_template"].is_string() &&
          c["chat_template"].get<std::string>().find("<think>") != std::string::npos)
        return ChatFormat::kimi_k2_thinking;
    }
  }
  return tok.kind() == Tokenizer::Kind::tiktoken ? ChatFormat::kimi_k2 : ChatFormat::deepseek_v3;
}

std::vector<ChatMessage> parse_messages(const json& j) {
  if (!j.is_array()) fail(ErrorKind::input, "messages", "expected a list of messages");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& m = j[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) fail(ErrorKind::input, where, "expected an object");
    ChatMessage c;
    if (!m.contains("role") || !m["role"].is_string()) fail(ErrorKind::input, where + ".role", "required string");
    c.role = m["role"].get<std::string>();
    if (c.role != "system" && c.role != "user" && c.role != "assistant" && c.role != "tool")
      fail(ErrorKind::input, where + ".role", "'{}' is not one of system, user, assistant, tool", c.role);
    if (m.contains("content") && !m["content"].is_null()) {
      if (m["content"].is_string()) {
        c.content = m["content"].get<std::string>();
      } else if (m["content"].is_array()) {  // [{type: text, text}] parts
        std::string s;
        for (auto& p : m["content"]) {
          if (!p.is_object() || p.value("type", "") != "text" || !p.contains("text") || !p["text"].is_string())
            fail(ErrorKind::input, where + ".content", "only text parts are supported");
          s += p["text"].get<std::string>();
        }
        c.content = s;
      } else {
        fail(ErrorKind::input, where + ".content", "expected a string, a list of text parts, or null");
      }
    }
    for (const char* k : {"reasoning_content", "reasoning"})
      if (m.contains(k) && m[k].is_string()) c.reasoning = m[k].get<std::string>();
    if (m.contains("tool_call_id")) {
      if (!m["tool_call_id"].is_string()) fail(ErrorKind::input, where + ".tool_call_id", "expected a string");
      c.tool_call_id = m["tool_call_id"].get<std::string>();
    }
    if (m.contains("name") && m["name"].is_string()) c.name = m["name"].get<std::string>();
    if (m.contains("tool_calls") && !m["tool_calls"].is_null()) {
      if (!m["tool_calls"].is_array()) fail(ErrorKind::input, where + ".tool_calls", "expected a list");
      for (size_t k = 0; k < m["tool_calls"].size(); ++k) {
        const json& t = m["tool_calls"][k];
        const std::string tw = fmt::format("{}.tool_calls[{}]", where, k);
        if (!t.is_object() || !t.contains("function") || !t["function"].is_object() || !t["function"].contains("name"))
          fail(ErrorKind::input, tw, "expected {{id, type, function: {{name, arguments}}}}");
        ToolCall tc;
        tc.id = t.value("id", "");
        tc.type = t.value("type", "function");
        tc.name = t["function"]["name"].get<std::string>();
        const json& a = t["function"].value("arguments", json("{}"));
        tc.arguments = a.is_string() ? a.get<std::string>() : a.dump();
        c.tool_calls.push_back(std::move(tc));
      }
    }
    out.push_back(std::move(c));
  }
  return out;
}

namespace {

// Accumulates segments: special tokens by id, text encoded in maximal runs between them (as the reference's
// encode of the rendered string splits at special tokens first).
struct Builder {
  const Tokenizer& tok;
  std::vector<int32_t> ids;
  std::string pending;

  void flush() {
    if (pending.empty()) return;
    const auto t = tok.encode(pending, false);
    ids.insert(ids.end(), t.begin(), t.end());
    pending.clear();
  }
  void special(const char* text) {
    flush();
    const auto id = tok.token_id(text);
    if (!id)
      fail(ErrorKind::input, "chat template", "the tokenizer has no token '{}' this chat format needs", text);
    ids.push_back(*id);
  }
  void text(const std::string& s) { pending += s; }
  int64_t pos() {
    flush();
    return static_cast<int64_t>(ids.size());
  }
};

const char* kKimiDefaultSystem = "You are Kimi, an AI assistant created by Moonshot AI.";

void render_kimi(Builder& b, const std::vector<ChatMessage>& msgs, const ChatOptions& o, bool thinking,
                 std::vector<Turn>& turns) {
  if (!o.tools.empty()) {
    b.special("<|im_system|>");
    b.text("tool_declare");
    b.special("<|im_middle|>");
    b.text(o.tools.dump());  // compact separators, as the template's tojson(separators=(',', ':'))
    b.special("<|im_end|>");
  }
  if (!msgs.empty() && msgs[0].role != "system") {
    b.special("<|im_system|>");
    b.text("system");
    b.special("<|im_middle|>");
    b.text(o.default_system.value_or(kKimiDefaultSystem));
    b.special("<|im_end|>");
  }
  // Kimi-K2-Thinking keeps the reasoning of the assistant turns after the last user message (the current
  // tool-use loop) and renders earlier ones with an empty <think></think>.
  size_t last_user = 0;
  for (size_t i = 0; i < msgs.size(); ++i)
    if (msgs[i].role == "user") last_user = i;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const ChatMessage& m = msgs[i];
    Turn t;
    t.role = m.role;
    t.start = b.pos();
    b.special(m.role == "user" ? "<|im_user|>" : m.role == "assistant" ? "<|im_assistant|>" : "<|im_system|>");
    b.text(!m.name.empty() ? m.name : m.role);
    b.special("<|im_middle|>");
    if (m.role == "assistant" && thinking) {
      b.special("<think>");
      t.think_start = b.pos();
      if (i > last_user) b.text(m.reasoning);
      t.think_end = b.pos();
      b.special("</think>");
    }
    t.content_start = b.pos();
    if (m.role == "tool") b.text("## Return of " + m.tool_call_id + "\n");
    b.text(m.content.value_or(""));
    t.content_end = b.pos();
    if (m.role == "assistant" && !m.tool_calls.empty()) {
      b.special("<|tool_calls_section_begin|>");
      for (const ToolCall& tc : m.tool_calls) {
        b.special("<|tool_call_begin|>");
        b.text(tc.id);
        b.special("<|tool_call_argument_begin|>");
        b.text(tc.arguments);
        b.special("<|tool_call_end|>");
      }
      b.special("<|tool_calls_section_end|>");
    }
    b.special("<|im_end|>");
    t.end = b.pos();
    turns.push_back(t);
  }
  if (o.add_generation_prompt) {
    Turn t;
    t.role = "generation";
    t.start = b.pos();
    b.special("<|im_assistant|>");
    b.text("assistant");
    b.special("<|im_middle|>");
    t.end = t.content_start = t.content_end = b.pos();
    turns.push_back(t);
  }
}

// DeepSeek-V3's shipped template, statement for statement (including its tool-call quirks: the first call of
// the conversation opens <｜tool▁calls▁begin｜>, each later call is followed by <｜tool▁calls▁end｜><｜end▁of▁sentence｜>).
void render_deepseek(Builder& b, const std::vector<ChatMessage>& msgs, const ChatOptions& o, std::vector<Turn>& turns) {
  bool is_first = false, is_tool = false, is_output_first = true, first_sp = true;
  std::string system;
  for (const auto& m : msgs)
    if (m.role == "system") {
      system += (first_sp ? "" : "\n\n") + m.content.value_or("");
      first_sp = false;
    }
  b.special("<｜begin▁of▁sentence｜>");
  const int64_t sys_start = b.pos();
  b.text(system);
  const int64_t sys_end = b.pos();
  for (const ChatMessage& m : msgs) {
    Turn t;
    t.role = m.role;
    t.start = b.pos();
    t.content_start = t.content_end = t.start;
    if (m.role == "system") {  // rendered above, before the first turn (every system turn spans the joined text)
      t.start = t.content_start = sys_start;
      t.end = t.content_end = sys_end;
      turns.push_back(t);
      continue;
    }
    if (m.role == "user") {
      is_tool = false;
      b.special("<｜User｜>");
      t.content_start = b.pos();
      b.text(m.content.value_or(""));
      t.content_end = b.pos();
    }
    if (m.role == "assistant" && !m.content) {
      is_tool = false;
      for (const ToolCall& tc : m.tool_calls) {
        if (!is_first) {
          b.special("<｜Assistant｜>");
          b.special("<｜tool▁calls▁begin｜>");
        } else {
          b.text("\n");
        }
        b.special("<｜tool▁call▁begin｜>");
        b.text(tc.type);
        b.special("<｜tool▁sep｜>");
        b.text(tc.name + "\n```json\n" + tc.arguments + "\n```");
        b.special("<｜tool▁call▁end｜>");
        if (is_first) {  // (the template closes the section after every later call, never after the first)
          b.special("<｜tool▁calls▁end｜>");
          b.special("<｜end▁of▁sentence｜>");
        }
        is_first = true;
      }
    }
    if (m.role == "assistant" && m.content) {
      if (is_tool) {
        b.special("<｜tool▁outputs▁end｜>");
        is_tool = false;
      } else {
        b.special("<｜Assistant｜>");
      }
      t.content_start = b.pos();
      b.text(*m.content);
      t.content_end = b.pos();
      b.special("<｜end▁of▁sentence｜>");
    }
    if (m.role == "tool") {
      is_tool = true;
      if (is_output_first) {
        b.special("<｜tool▁outputs▁begin｜>");
        is_output_first = false;
      } else {
        b.text("\n");
      }
      b.special("<｜tool▁output▁begin｜>");
      t.content_start = b.pos();
      b.text(m.content.value_or(""));
      t.content_end = b.pos();
      b.special("<｜tool▁output▁end｜>");
    }
    t.end = b.pos();
    turns.push_back(t);
  }
  if (is_tool) b.special("<｜tool▁outputs▁end｜>");
  if (o.add_generation_prompt && !is_tool) {
    Turn t;
    t.role = "generation";
    t.start = b.pos();
    b.special("<｜Assistant｜>");
    t.end = t.content_start = t.content_end = b.pos();
    turns.push_back(t);
  }
}

}  // namespace

RenderedChat render_chat(const Tokenizer& tok, ChatFormat fmt, const std::vector<ChatMessage>& messages,
                         const ChatOptions& opts) {
  Builder b{tok, {}, {}};
  RenderedChat r;
  if (fmt == ChatFormat::deepseek_v3) render_deepseek(b, messages, opts, r.turns);
  else render_kimi(b, messages, opts, fmt == ChatFormat::kimi_k2_thinking, r.turns);
  b.flush();
  r.ids = std::move(b.ids);
  r.prompt_end = static_cast<int64_t>(r.ids.size());
  for (int32_t id : r.ids)
    if (id >= tok.id_limit()) fail(ErrorKind::input, "chat template", "token {} is past the model's vocabulary", id);
  return r;
}

}  // namespace kscope
