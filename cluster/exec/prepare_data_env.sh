#!/bin/bash
# The environment of a data preparation job: `source prepare_data_env.sh PYTHON_BIN_DIR`. You do not submit anything
# yourself: scripts/prepare_data.py --executor slurm submits its stages with datatrove's SlurmPipelineExecutor, and
# each job script that datatrove writes sources this file before it calls `launch_pickled_pipeline`:
#
#   python scripts/prepare_data.py --input /shared/corpus --output_dir /shared/data --tokenizer /shared/tokenizer \
#       --dedup_paragraphs --max_token_ratio 2.5 --executor slurm --tasks 256 \
#       --slurm_args "--partition=cpu --time=04:00:00 --cpus-per-task=1 --mem-per-cpu=4G" --slurm_logs logs/prepare
#
# Run that on a login node, in the Python environment with the requirements (on a shared file system): the tasks
# run in that same environment (PYTHON_BIN_DIR, its bin folder, which holds datatrove's commands), not in the
# training image, which has no Slurm commands (datatrove's tasks call `scontrol`). Re-running the same command after
# a failure or a time limit submits only the unfinished tasks.

# This checkout (the file's own folder's grandparent): its code first on the path.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$1:$PATH"
# One tokenizer thread per CPU Slurm gave the task (the stages are single-threaded per task).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$OMP_NUM_THREADS}"
echo "[$(date -Is)] prepare_data: task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}}"
