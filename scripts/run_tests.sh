#!/usr/bin/env bash
# The test suite on a fresh machine: environment, system packages for the Slurm test, the linter, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# In CI (CI=true) a missing Slurm stops the run here, and any skipped test fails (tests/ci_skips.py); on a
# workstation without root the Slurm tests skip.
if [ "${CI:-}" = true ]; then
    bash cluster/install_ci_deps.sh
else
    bash cluster/install_ci_deps.sh || echo "warning: Slurm test dependencies not installed; the Slurm tests will skip"
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"
