#!/usr/bin/env bash
# Does a change of the CUDA sources change the code the GPU runs? Compiles each of FILES (default the kernels and the
# backend) to PTX from the working tree and from REV (default HEAD) with the build's own nvcc command line (BUILD,
# default build/, configured with KSCOPE_CUDA=ON) and compares them. Byte-identical PTX means identical SASS, so a
# pure refactor (a comment, a restructured `if constexpr`) needs no device run; any difference is listed per file,
# with the kernels whose PTX differs.
# The working tree's uncommitted changes to tracked files count; untracked files do not.
#   run: bash scripts/ptx_same.sh [REV]        (no GPU needed; ~1 minute per file)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD}
BUILD=${BUILD:-build}
FILES=${FILES:-src/backend/cuda/kernels.cu src/backend/cuda/cuda_backend.cu}
[ -f "$BUILD/compile_commands.json" ] || { echo "ptx_same.sh: no $BUILD/compile_commands.json (configure with KSCOPE_CUDA=ON)"; exit 2; }
tmp=$(mktemp -d)
P=$tmp/tree  # both versions compile at this one path (the unnamed namespace's mangled names depend on it)
git worktree add -q --detach "$P" HEAD
trap 'git worktree remove --force "$P"; rm -rf "$tmp"' EXIT
git diff HEAD --binary > "$tmp/wt.patch"  # the working tree's changes to tracked files
[ -s "$tmp/wt.patch" ] && (cd "$P" && git apply "$tmp/wt.patch")
root=$PWD
status=0
ptx() {  # ptx FILE OUT: FILE compiled to PTX at $P with the build's flags
  local cmd
  cmd=$(python3 - "$BUILD/compile_commands.json" "$root/$1" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1])):
    if e["file"] == sys.argv[2]:
        print(e["command"]); break
PY
)
  [ -n "$cmd" ] || return 3
  cmd=$(echo "$cmd" | sed -E "s/ -c / -ptx /; s# -o [^ ]+# -o $2#; s#$root/#$P/#g")
  (cd "$BUILD" && eval "$cmd" >/dev/null 2>&1)
}
for f in $FILES; do ptx "$f" "$tmp/new-$(basename "$f").ptx" || { echo "$f: the working tree does not compile (or is not in the build)"; status=2; }; done
(cd "$P" && git checkout -q -f "$REV" && git clean -qfd)
for f in $FILES; do
  n=$tmp/new-$(basename "$f").ptx o=$tmp/old-$(basename "$f").ptx
  [ -f "$n" ] || continue
  ptx "$f" "$o" || { echo "$f: $REV does not compile"; status=2; continue; }
  if cmp -s "$o" "$n"; then
    echo "$f: PTX identical to $REV"
  else
    echo "$f: PTX differs from $REV ($(diff "$o" "$n" | grep -c '^[<>]') lines); the kernels whose code differs:"
    python3 - "$o" "$n" <<'PY' | c++filt | sed 's/^/  /'
import re, sys
def entries(path):  # each .entry's body by its mangled name
    out, name = {}, None
    for line in open(path):
        m = re.match(r"\s*(?:\.\w+\s+)*\.entry\s+([^\s(]+)", line)
        if m: name = m.group(1); out[name] = []
        if name: out[name].append(line)
    return out
a, b = entries(sys.argv[1]), entries(sys.argv[2])
for k in sorted(set(a) | set(b)):
    if a.get(k) != b.get(k): print(("(new) " if k not in a else "(gone) " if k not in b else "") + k)
PY
    status=1
  fi
done
exit $status
