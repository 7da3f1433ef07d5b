#!/usr/bin/env bash
# A separate virtual environment with the peers the benchmarks compare against (litgpt, litdata), kept apart from
# the project's .venv because litgpt pins its own versions of shared packages.
#
#   bash bench/setup_env.sh [VENV_DIR]        # default: .venv-bench
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-bench}
PYTHON=${PYTHON:-python3}
[ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0  # first, so that the peers reuse the project's torch
"$VENV/bin/python" -m pip install -q -r bench/requirements-bench.txt
# This checkout (lit_gpt, scripts) importable beside the peers; the peers' own pins stay as they are.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
# litdata declares torchvision, whose PyPI wheel is built for CUDA torch: on a CPU torch its operators fail to
# register and `import litgpt` breaks. Neither benchmark uses it.
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -y -q torchvision
fi
"$VENV/bin/python" -c "import litgpt.pretrain, litdata" && echo "benchmark peers ready in $VENV"
