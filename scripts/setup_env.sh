#!/usr/bin/env bash
# Create .venv and install the pinned CPU stack (idempotent; re-installs only when a requirements file changed).
# Also installs Debian's fortunes-de (the demo corpus) when apt is available and it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/games/fortunes/de ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's fortunes-de (German demo corpus)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    apt_log=$(mktemp)
    { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes-de; } \
        >"$apt_log" 2>&1 || true
    # Judged by the result, not apt's exit code (a failed index update of an unrelated source is not a failure here).
    if [ ! -d /usr/share/games/fortunes/de ]; then
        cat "$apt_log" >&2
        echo "warning: could not install fortunes-de (apt's output above); give the demo a corpus of your own:" \
             "bash scripts/demo.sh path/to/corpus" >&2
    fi
    rm -f "$apt_log"
fi

PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
stamp=.venv/.requirements-stamp
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "Installing Python requirements into .venv ..."
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
    # This checkout as a package (lit_gpt, pretrain, scripts and the llammlein-* commands); edits take effect at once.
    # Its dependencies are the pins just installed, so nothing else is resolved.
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
