#!/usr/bin/env bash
# The web console in headless Chromium (Playwright) against a real `colony dev` cluster; writes
# docs/console-*.png. Installs what is missing: Debian's chromium, and Playwright for Python into
# ~/.cache/colony/playwright (the pattern cluster/test.sh uses for grpcio). Builds unless
# COLONY_SKIP_BUILD is set. COLONY_CONSOLE_BASE_PORT (default 7301) moves the cluster's ports;
# COLONY_CONSOLE_KEEP=1 keeps the cluster's directory after a pass.
set -euo pipefail
cd "$(dirname "$0")/../.."
source cluster/setup.sh
if [ ! -x /usr/bin/chromium ]; then
    echo "installing: chromium" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: need root (or sudo) to install chromium" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2
fi
playwright_dir="$HOME/.cache/colony/playwright"
if ! PYTHONPATH="$playwright_dir" python3 -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "installing: playwright (into $playwright_dir)" >&2
    python3 -m pip install --quiet --target "$playwright_dir" playwright >&2
fi
if [ -z "${COLONY_SKIP_BUILD:-}" ]; then
    cargo build --release --workspace --all-targets
fi
export COLONY_BIN="$CARGO_TARGET_DIR/release/colony"
PYTHONPATH="$playwright_dir" exec python3 tests/console/console_test.py
