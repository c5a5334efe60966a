#!/usr/bin/env bash
# Renders Debian's man pages (manpages, manpages-dev, manpages-{fr,de,es}[-dev]) to plain text, one file per
# language, for the demo model's tokenizer and training. Run here (needs groff and the packages); the device has
# no Debian packages. Output: OUT/{en,fr,de,es}.txt.gz, pages in sorted path order, separated by a form feed.
#   bash scripts/demo-model/prepare_corpus.sh OUT [MAX_PAGES_PER_LANGUAGE]
set -euo pipefail
out=${1:?usage: prepare_corpus.sh OUT [MAX_PAGES]}
max=${2:-2500}
mkdir -p "$out"
render() {  # one page -> plain UTF-8 text (no bold, underline or color), trailing blanks trimmed
  zcat -f "$1" | groff -k -man -Tutf8 -P -cbou 2>/dev/null | sed 's/[[:space:]]*$//' | cat -s
}
export -f render
for lang in en fr de es; do
  # the pages the man-page packages install (manpages + manpages-dev for English, manpages-LANG[-dev] otherwise)
  if [ "$lang" = en ]; then pk=(manpages manpages-dev); else pk=(manpages-$lang manpages-$lang-dev); fi
  tmp="$out/tmp-$lang"
  rm -rf "$tmp"; mkdir -p "$tmp"
  dpkg -L "${pk[@]}" 2>/dev/null | grep -E '/man[1-8]/[^/]+\.gz$' > "$out/$lang.all" || true
  LC_ALL=C sort -u "$out/$lang.all" > "$out/$lang.sorted"
  head -n "$max" "$out/$lang.sorted" > "$out/$lang.list"
  rm -f "$out/$lang.all" "$out/$lang.sorted"
  awk '{printf "%s\t%06d\n", $0, NR}' "$out/$lang.list" |
    xargs -P "$(nproc)" -L 1 bash -c 'render "$0" > "'"$tmp"'/$1.txt"'
  for f in $(ls "$tmp" | LC_ALL=C sort); do cat "$tmp/$f"; printf '\n\f\n'; done | gzip -9n > "$out/$lang.txt.gz"
  rm -rf "$tmp"
  echo "$lang: $(wc -l < "$out/$lang.list") pages, $(zcat "$out/$lang.txt.gz" | wc -c) bytes"
done
