#!/bin/bash
# The environment of a data preparation job. scripts/prepare_data.py --executor slurm submits its stages with
# datatrove's SlurmPipelineExecutor; each job script datatrove writes sources this file before it calls
# `launch_pickled_pipeline` (and `merge_stats`). You do not submit anything yourself:
#
#   python scripts/prepare_data.py --input /shared/corpus --output_dir /shared/data --tokenizer /shared/tokenizer \
#       --dedup_paragraphs --max_token_ratio 2.5 --executor slurm --tasks 256 \
#       --slurm_args "--partition=cpu --time=04:00:00 --cpus-per-task=1 --mem-per-cpu=4G" --slurm_logs logs/prepare
#
# Run that on a login node, in an environment with the requirements (it plans the shards and submits the jobs); the
# tasks run in the image like the trainer. Re-running the same command after a failure or a time limit submits
# only the unfinished tasks. Env: LLAMMLEIN_IMAGE, LLAMMLEIN_BINDS, LLAMMLEIN_NO_CONTAINER=1 (with PYTHON).

# This checkout (the file's own folder's grandparent): its code first on the path, inside the image too.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
# One tokenizer thread per CPU Slurm gave the task (the stages are single-threaded per task).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$OMP_NUM_THREADS}"
echo "[$(date -Is)] prepare_data: task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}"

if [ "${LLAMMLEIN_NO_CONTAINER:-0}" = 1 ]; then
    # datatrove's commands are console scripts of the Python environment that has the requirements.
    PYTHON_BIN="$(dirname "$(command -v "${PYTHON:-python}")")"
    export PATH="$PYTHON_BIN:$PATH"
else
    IMAGE="${LLAMMLEIN_IMAGE:-$REPO_DIR/llammlein.sif}"
    if [ ! -f "$IMAGE" ]; then
        echo "error: container image $IMAGE not found; build it (bash cluster/building/build-image.sh)," \
             "set LLAMMLEIN_IMAGE, or run without a container (LLAMMLEIN_NO_CONTAINER=1)" >&2
        exit 2
    fi
    RUNTIME="$(command -v apptainer || command -v singularity || true)"
    if [ -z "$RUNTIME" ]; then
        echo "error: neither apptainer nor singularity is on PATH (module load apptainer?)" >&2
        exit 2
    fi
    # datatrove calls its commands by name: these run them in the image. The checkout and the data's file systems
    # must be visible there (LLAMMLEIN_BINDS), and so must Slurm's `scontrol` (datatrove asks it for the node list).
    in_image() { "$RUNTIME" exec --bind "$REPO_DIR${LLAMMLEIN_BINDS:+,$LLAMMLEIN_BINDS}" --pwd "$REPO_DIR" "$IMAGE" "$@"; }
    launch_pickled_pipeline() { in_image launch_pickled_pipeline "$@"; }
    merge_stats() { in_image merge_stats "$@"; }
fi
