#!/usr/bin/env bash
# Make Debian's Chromium available for the dashboard's browser test.
# Best effort by default: without it, tests/test_dashboard.py is skipped and says why.
# With FL_REQUIRE_BROWSER=1 (set by .ci/run) a browser that cannot be had fails the build here, and the test
# fails rather than skips.
set -u
fail_or_note() {
  if [ "${FL_REQUIRE_BROWSER:-}" = "1" ]; then
    echo "error: FL_REQUIRE_BROWSER=1 but $1" >&2
    exit 1
  fi
  echo "note: $1; the dashboard browser test will be skipped" >&2
  exit 0
}
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "${FL_NO_BROWSER_INSTALL:-}" = "1" ]; then
  fail_or_note "FL_NO_BROWSER_INSTALL=1: chromium is not installed"
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  fail_or_note "no chromium and no root apt-get here to install it"
fi
echo "installing Debian's chromium with apt-get for the dashboard browser test (FL_NO_BROWSER_INSTALL=1 skips this)..." >&2
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get install -y -q chromium >/dev/null 2>&1 \
  || { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 600 apt-get install -y -q chromium >/dev/null 2>&1; } \
  || fail_or_note "could not install chromium (apt-get install chromium failed)"
exit 0
