#!/usr/bin/env bash
# The report tests open pages in a real headless Chromium (Debian's chromium and chromium-driver).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "rayalign setup: installing chromium and chromium-driver for the report tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "rayalign setup: the report tests need chromium and chromedriver on PATH" \
         "(Debian: sudo apt-get install chromium chromium-driver)" >&2
    exit 1
fi
