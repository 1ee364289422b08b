#!/usr/bin/env bash
# The browser of tests/test_playground.py: Debian's chromium, from apt (plus two small font packages so that
# screenshots have text). The Python side, playwright, comes with the dev extra (scripts/setup.sh); the tests
# launch this chromium by its path, so Playwright's own browser download (`playwright install`) is never used.
#   FORCE=1   reinstall even where a chromium is already on PATH
set -euo pipefail
if [ "${FORCE:-0}" != "1" ] && command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo '?')"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null
echo "installed $(chromium --version 2>/dev/null || echo 'chromium (no version)')"
