#!/usr/bin/env bash
# The test suite on a fresh machine: environment, system packages for the Slurm test, the linter, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash cluster/install_ci_deps.sh || echo "warning: Slurm test dependencies not installed; the Slurm test will skip"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"
