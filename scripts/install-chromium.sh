#!/usr/bin/env bash
# Chromium for the browser tests of the web page (Playwright for Python drives it through `executable_path`; nothing
# is downloaded by `playwright install`). Debian's package, installed with apt-get (as root).
#
#   scripts/install-chromium.sh        (make runs this before the tests and the demo)
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
else
  echo "the browser tests need Chromium: run (as root) 'apt-get install chromium', then 'make browser'" >&2
  exit 1
fi
