#!/usr/bin/env bash
# Run here (the Debian build machine), once: packs the Debian -dev packages the GPU machine lacks (headers, shared
# libraries, CMake configs; no static ICU, no docs) into .deps/prefix.tar.xz (git-ignored via .git/info/exclude),
# small enough to travel with the working tree. The device scripts unpack it into a private prefix.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info && grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download nlohmann-json3-dev libfmt-dev libfmt9 libicu-dev libicu72 libgtest-dev libgmock-dev)
mkdir -p "$tmp/p"
for f in "$tmp"/*.deb; do dpkg -x "$f" "$tmp/p"; done
L="$tmp/p/usr/lib/x86_64-linux-gnu"
rm -f "$L"/libicu*.a "$L"/libicui18n* "$L"/libicuio* "$L"/libicutu* "$L"/libicutest*
rm -rf "$tmp/p/usr/share/doc" "$tmp/p/usr/share/man" "$tmp/p/usr/bin" "$tmp/p/usr/sbin" "$tmp/p/usr/share/lintian"
mkdir -p .deps
tar -C "$tmp/p" -cJf .deps/prefix.tar.xz usr
rm -rf "$tmp"
ls -la .deps
