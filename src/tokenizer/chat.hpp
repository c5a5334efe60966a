// Chat templates rendered straight to token ids, with turn boundaries (role, token span, content span,
// thinking span) for the capture and steering code to select positions with. Structural tokens are emitted as
// ids; message text is encoded as ordinary text, so content can never inject control tokens.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.hpp"

namespace kscope {

enum class ChatFormat {
  kimi_k2,           // Kimi-K2-Instruct: <|im_system|>/<|im_user|>/<|im_assistant|> role <|im_middle|> ... <|im_end|>
  kimi_k2_thinking,  // Kimi-K2-Thinking: as above, assistant turns carry <think>reasoning</think>
  deepseek_v3,       // DeepSeek-V3: <｜begin▁of▁sentence｜>system<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>
};
const char* chat_format_name(ChatFormat f);
ChatFormat parse_chat_format(const std::string& s);

struct ToolCall {
  std::string id, type = "function", name, arguments;  // arguments: a JSON string, as OpenAI sends it
};

struct ChatMessage {
  std::string role;  // system | user | assistant | tool
  std::optional<std::string> content;  // null content is meaningful to DeepSeek's template (tool-call turns)
  std::string reasoning;               // reasoning_content (thinking) of an assistant turn
  std::vector<ToolCall> tool_calls;
  std::string tool_call_id, name;
};

struct ChatOptions {
  bool add_generation_prompt = true;
  nlohmann::json tools = nlohmann::json::array();  // OpenAI tool declarations
  std::optional<std::string> default_system;       // Kimi: injected when the first message is not a system one
};

struct Turn {
  std::string role;
  int64_t start = 0, end = 0;                  // tokens of the whole turn, [start, end)
  int64_t content_start = 0, content_end = 0;  // tokens of its text
  int64_t think_start = -1, think_end = -1;    // tokens inside <think>...</think>, when present
};

struct RenderedChat {
  std::vector<int32_t> ids;
  std::vector<Turn> turns;       // one per message, then "generation" for the generation prompt
  int64_t prompt_end = 0;        // == ids.size(); generation continues from here
};

// OpenAI-shaped messages: [{role, content, reasoning_content?, tool_calls?, tool_call_id?, name?}], each error
// naming the message index and field.
std::vector<ChatMessage> parse_messages(const nlohmann::json& j);

// The format a checkpoint's tokenizer speaks: tokenizer_config.json's "kscope_chat_format" when present, else
// Kimi-K2 for tiktoken-style tokenizers (K2-Thinking when the chat template mentions <think>) and DeepSeek-V3
// for tokenizer.json ones.
ChatFormat default_chat_format(const Tokenizer& tok, const std::string& dir);

RenderedChat render_chat(const Tokenizer& tok, ChatFormat fmt, const std::vector<ChatMessage>& messages,
                         const ChatOptions& opts = {});

}  // namespace kscope
