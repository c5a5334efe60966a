#!/usr/bin/env bash
# Run here (the Debian build machine), once: downloads the Debian -dev packages the GPU machine lacks into .deps/
# (git-ignored via .git/info/exclude). The device scripts unpack them into a private prefix; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
mkdir -p .deps
cd .deps
apt-get download nlohmann-json3-dev libfmt-dev libfmt9 libicu-dev libicu72 libgtest-dev libgmock-dev libcli11-dev
ls -la
