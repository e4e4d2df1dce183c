#!/bin/sh
# Debian's Chromium for the app's end-to-end test (Playwright drives it; never `playwright install`).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo) and the Debian mirror.
set -e
if [ -x /usr/bin/chromium ]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
/usr/bin/chromium --version
