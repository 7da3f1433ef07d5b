#!/usr/bin/env bash
# Debian packages for the local-Slurm test (tests/test_slurm.py): slurmctld, slurmd, the client tools and munge.
# Fails loudly (exit 1, an "error:" line saying what to do) when it cannot install them: in CI a Slurm test that skips
# is a failure (tests/ci_skips.py), so the pre-emption guarantee cannot silently drop out of CI.
# Idempotent: does nothing when everything is installed.
set -uo pipefail

PACKAGES=(slurm-wlm munge)
# Binaries the test starts or calls; if all exist there is nothing to do.
NEEDED=(munged slurmctld slurmd sbatch srun scontrol squeue scancel)

missing=()
for bin in "${NEEDED[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_ci_deps: Slurm and munge already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_ci_deps: error: apt-get not available; install ${PACKAGES[*]} yourself (missing: ${missing[*]})" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_ci_deps: error: not root and no password-less sudo; install ${PACKAGES[*]} yourself" \
             "(missing: ${missing[*]})" >&2
        exit 1
    fi
fi

echo "install_ci_deps: installing ${PACKAGES[*]} (missing: ${missing[*]}) ..."
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent in fresh containers; a failed update is not fatal if the install still works.
$SUDO apt-get update -qq >/dev/null 2>&1 || echo "install_ci_deps: apt-get update failed; trying the install anyway"
# --no-install-recommends: the daemons and client tools are all the test needs (no mail server, docs, ...).
if ! $SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; then
    echo "install_ci_deps: error: apt-get install ${PACKAGES[*]} failed" >&2
    exit 1
fi
echo "install_ci_deps: installed ${PACKAGES[*]}"
