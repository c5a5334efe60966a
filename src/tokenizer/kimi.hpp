// Kimi-K2's tokenizer layout: a tiktoken.model of base ranks, then 256 + 2 special ids named by
// tokenizer_config.json (the rest <|reserved_token_{id}|>).
#pragma once
#include <map>
#include <string>

namespace kscope {

// Offsets (from the first special id) and names of Kimi-K2's named special tokens, as its tokenizer_config.json
// registers them (e.g. [BOS] = 163584 = base + 0, <|im_middle|> = base + 17, <think> = base + 22).
const std::map<int, std::string>& kimi_special_names();

// Writes a Kimi-format tokenizer directory (tiktoken.model + tokenizer_config.json with added_tokens_decoder,
// bos/eos/pad and chat format) from tiktoken ranks (a .tiktoken file or tiktoken's npm encoder JSON).
// Returns the number of base ranks.
int write_kimi_tokenizer(const std::string& out_dir, const std::string& ranks_path);

}  // namespace kscope
