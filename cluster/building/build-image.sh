#!/usr/bin/env bash
# Build the training image llammlein.sif from llammlein.def (CUDA 13.0, pinned stack, FlashAttention-2, -3 and -4).
#
#   bash cluster/building/build-image.sh [OUTPUT.sif] [extra apptainer build options, e.g. --fakeroot]
#
# Env: MAX_JOBS (parallel nvcc jobs for the FlashAttention builds; default: from the build host's CPUs and RAM),
#      NVCC_THREADS (default 2), APPTAINER_TMPDIR / APPTAINER_CACHEDIR (put them on a large local disk: the build
#      needs ~30 GiB there). Takes ~1 h on 32 cores. Needs Apptainer >= 1.2 or SingularityCE >= 4 (build arguments)
#      and, without root, --fakeroot or a cluster build node.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# OUTPUT is optional: a first argument that is an option (`build-image.sh --fakeroot`) goes to apptainer build.
OUTPUT=llammlein.sif
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    OUTPUT="$1"
    shift
fi

RUNTIME=""
for candidate in apptainer singularity; do
    if command -v "$candidate" >/dev/null 2>&1; then
        RUNTIME="$candidate"
        break
    fi
done
if [ -z "$RUNTIME" ]; then
    echo "error: neither 'apptainer' nor 'singularity' is on PATH; building $OUTPUT needs one of them." >&2
    echo "       Install Apptainer (https://apptainer.org/docs/admin/main/installation.html) or load your" >&2
    echo "       cluster's module (e.g. 'module load apptainer'), then re-run this script." >&2
    exit 127
fi

# %arguments/--build-arg in the definition file arrived in Apptainer 1.2 and SingularityCE 4.0.
# Judge by what --version reports: `singularity` is often Apptainer's compatibility link.
version_text="$("$RUNTIME" --version 2>/dev/null || true)"
version="$(grep -oE '[0-9]+\.[0-9]+' <<< "$version_text" | sed -n 1p || true)"
major="${version%%.*}"; minor="${version#*.}"
if [ -n "$version" ]; then
    too_old=0
    if [[ "$version_text" == *apptainer* ]]; then
        { [ "$major" -lt 1 ] || { [ "$major" -eq 1 ] && [ "$minor" -lt 2 ]; }; } && too_old=1
    else
        [ "$major" -lt 4 ] && too_old=1
    fi
    if [ "$too_old" = 1 ]; then
        echo "error: $RUNTIME $version is too old for llammlein.def (build arguments); need Apptainer >= 1.2" \
             "or SingularityCE >= 4.0." >&2
        exit 1
    fi
fi

case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
cd "$REPO_DIR"  # %files sources are relative to the repository root
for f in llammlein.def requirements.txt requirements-cuda.txt lit_gpt pretrain scripts; do
    [ -e "$f" ] || { echo "error: $REPO_DIR/$f is missing; run from a complete checkout." >&2; exit 1; }
done

build_args=(--build-arg "NVCC_THREADS=${NVCC_THREADS:-2}")
[ -n "${MAX_JOBS:-}" ] && build_args+=(--build-arg "MAX_JOBS=$MAX_JOBS")
echo "Building $OUTPUT with $RUNTIME ${version:-?} (MAX_JOBS=${MAX_JOBS:-auto})..."
"$RUNTIME" build "${build_args[@]}" "$@" "$OUTPUT" llammlein.def
echo "Built $OUTPUT. Check it on a GPU node: $RUNTIME test --nv $OUTPUT"
