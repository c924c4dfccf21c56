#!/usr/bin/env bash
# The demo page's browser test: installs what is missing (Debian's chromium, playwright-core),
# builds the server unless ROOMCAST_BIN names one, and runs demo.test.mjs. Exits non-zero on
# failure. Meant for CI (root, CI=true) and for developers alike:
#
#   bash tests/browser/run.sh
#   ROOMCAST_BIN=/path/to/roomcast bash tests/browser/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# A relative ROOMCAST_BIN means relative to where we were called from; this script changes directory.
if [ -n "${ROOMCAST_BIN:-}" ]; then
    ROOMCAST_BIN=$(realpath "$ROOMCAST_BIN")
    export ROOMCAST_BIN
fi

if [ ! -x /usr/bin/chromium ]; then
    echo "== installing chromium (Debian)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium
fi

echo "== playwright-core (npm ci)"
cd "$here"
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi

if [ -z "${ROOMCAST_BIN:-}" ]; then
    echo "== building roomcast"
    (cd "$root" && cargo build --bin roomcast)
    target=${CARGO_TARGET_DIR:-target}
    case "$target" in /*) ;; *) target="$root/$target" ;; esac
    export ROOMCAST_BIN="$target/debug/roomcast"
fi

echo "== browser test ($ROOMCAST_BIN, $(/usr/bin/chromium --version 2>/dev/null || echo chromium))"
node --test --test-reporter=spec demo.test.mjs
