#!/bin/bash
# Pretraining job: one Slurm task per GPU, Fabric takes its ranks from Slurm, pre-emption safe.
#
#   sbatch cluster/exec/train_fabric.sh [--trainer_flag value ...]            # submit from the repository root
#   MODEL_NAME=LLaMmlein_7B OUT_DIR=/scratch/$USER/7b sbatch --nodes=16 cluster/exec/train_fabric.sh --max_steps 1430512
#
# Slurm sends USR1 120 s before the time limit (and SIGTERM on pre-emption); the trainer then finishes its step,
# checkpoints, runs `scontrol requeue` and exits. The requeued job (same job id) starts with --resume auto and
# continues from that checkpoint; the log is appended to, so one file tells the whole story.
# A hung training step (see --hang_factor) ends the trainer with exit code 75 and a report naming the node(s) whose
# ranks did not arrive at the step's collective; this script then adds them to the job's excluded nodes and requeues
# it, and the requeued job resumes from the last checkpoint on other nodes.
# Knobs (environment, with defaults below): MODEL_NAME, OUT_DIR, TRAIN_DATA_DIR, VAL_DATA_DIR, TOKENIZER_PATH,
# LLAMMLEIN_IMAGE, LLAMMLEIN_BINDS (extra binds, comma-separated), TRAIN_ARGS (extra trainer flags), PYTHON,
# LLAMMLEIN_NO_CONTAINER=1 (run python directly: CPU tests, or an environment without Apptainer),
# LLAMMLEIN_NETWORK=ib|efa|socket, MASTER_PORT, and the NCCL_* variables below. Arguments go to the trainer last.
#
# Fabric refuses --ntasks; always give --ntasks-per-node (= GPUs per node) and --nodes.
#SBATCH --job-name=llammlein
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:h100:4
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=llammlein-%j.out
set -euo pipefail

# Slurm runs a copy of this script from its spool directory: find the checkout from the submit directory.
REPO_DIR="${LLAMMLEIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR"
# This checkout's code, inside the image too (its PYTHONPATH keeps ours first) and in a bare Python environment.
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
REPO_DIR="$(pwd -P)"
if [ ! -f pretrain/tinyllama_fabric.py ]; then
    echo "error: $REPO_DIR has no pretrain/tinyllama_fabric.py;" \
         "submit from the repository root or set LLAMMLEIN_ROOT" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: not inside a Slurm job; submit with sbatch (srun must start one trainer task per GPU)" >&2
    exit 2
fi
if [ -z "${SLURM_NTASKS_PER_NODE:-}" ]; then
    echo "error: the job has no --ntasks-per-node (Fabric rejects --ntasks); give --nodes and --ntasks-per-node" >&2
    exit 2
fi

MODEL_NAME="${MODEL_NAME:-LLaMmlein_1B}"
OUT_DIR="${OUT_DIR:-out/$MODEL_NAME}"
TRAIN_DATA_DIR="${TRAIN_DATA_DIR:-data/train}"
VAL_DATA_DIR="${VAL_DATA_DIR:-data/val}"
TOKENIZER_PATH="${TOKENIZER_PATH:-tokenizer}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"

# ---- rendezvous -------------------------------------------------------------------------------------------------
# Rank 0 lives on the first node of the allocation; every rank must agree on it (Fabric would derive the same).
# (Read all of scontrol's output: `| head -n 1` can kill it with SIGPIPE, which pipefail turns into a silent exit.)
hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
MASTER_ADDR="${hosts%%$'\n'*}"
if [ -z "$MASTER_ADDR" ]; then
    echo "error: 'scontrol show hostnames $SLURM_JOB_NODELIST' returned no host" >&2
    exit 2
fi
# A per-job port, so that two jobs sharing a node do not collide; override with MASTER_PORT.
MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT

# ---- NCCL and network -------------------------------------------------------------------------------------------
# Errors and warnings only; INFO prints topology per rank (set NCCL_DEBUG=INFO to debug a hang).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Interfaces for NCCL's bootstrap/socket traffic: anything but loopback and docker bridges.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# Turn NCCL errors and collective timeouts into a crashed rank (a failed job) instead of a silent hang.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
case "${LLAMMLEIN_NETWORK:-ib}" in
    ib)
        # InfiniBand HCAs NCCL may use: the prefix "mlx5" matches every Mellanox/NVIDIA ConnectX port.
        export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
        ;;
    efa)
        # AWS Elastic Fabric Adapter through libfabric (needs the aws-ofi-nccl plugin in the image or bound in).
        export FI_PROVIDER=efa
        # RDMA straight from GPU memory (p4d/p5 instances).
        export FI_EFA_USE_DEVICE_RDMA="${FI_EFA_USE_DEVICE_RDMA:-1}"
        # Data loader workers fork after libfabric registered memory; make that safe.
        export FI_EFA_FORK_SAFE=1
        ;;
    socket)
        # No RDMA fabric: TCP only (slow; for debugging or Ethernet-only clusters).
        export NCCL_IB_DISABLE=1
        ;;
    *)
        echo "error: LLAMMLEIN_NETWORK must be ib, efa or socket, got '${LLAMMLEIN_NETWORK}'" >&2
        exit 2
        ;;
esac

# ---- processes ----------------------------------------------------------------------------------------------------
# Math libraries get the task's own cores only; otherwise every rank starts one thread per core of the node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on, or each rank gets one core
# (and its data loader workers starve).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi
# Log lines reach this job's output file as they are written.
export PYTHONUNBUFFERED=1
# Node-local compile caches (shared file systems make triton/inductor slow and racy across ranks).
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-${SLURM_JOB_ID}}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/inductor-${SLURM_JOB_ID}}"
# FlashAttention-4 JIT-compiles its CuTe DSL kernels in every process at every start; its disk cache (keyed by its own
# sources, no absolute paths) beside the run makes a restart, a requeue and every further rank load them instead.
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}"
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR="${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-$OUT_DIR/.fa4-kernel-cache}"

# ---- launch -------------------------------------------------------------------------------------------------------
TRAINER=(pretrain/tinyllama_fabric.py
    --model_name "$MODEL_NAME" --out_dir "$OUT_DIR"
    --train_data_dir "$TRAIN_DATA_DIR" --val_data_dir "$VAL_DATA_DIR" --tokenizer_path "$TOKENIZER_PATH"
    --resume auto)
# Devices per node and nodes are not passed: under srun the trainer reads them from Slurm's environment.
# TRAIN_ARGS is a flag list: split on whitespace, without glob expansion.
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"

if [ "${LLAMMLEIN_NO_CONTAINER:-0}" = 1 ]; then
    LAUNCH=("$PYTHON")
else
    IMAGE="${LLAMMLEIN_IMAGE:-$REPO_DIR/llammlein.sif}"
    if [ ! -f "$IMAGE" ]; then
        echo "error: container image $IMAGE not found; build it (bash cluster/building/build-image.sh)," \
             "set LLAMMLEIN_IMAGE, or run without a container (LLAMMLEIN_NO_CONTAINER=1)" >&2
        exit 2
    fi
    RUNTIME="$(command -v apptainer || command -v singularity || true)"
    if [ -z "$RUNTIME" ]; then
        echo "error: neither apptainer nor singularity is on PATH of the compute node (module load apptainer?)" >&2
        exit 2
    fi
    # The checkout (code), data, tokenizer and output must be visible inside the container. The parent of a data
    # dir covers train/ and val/ side by side; paths inside an already bound directory need no bind of their own.
    binds=("$REPO_DIR")
    add_bind() {
        local path b
        path="$(realpath "$1")"
        for b in "${binds[@]}"; do
            case "$path/" in "$b"/*) return 0 ;; esac
        done
        binds+=("$path")
    }
    add_bind "$OUT_DIR"
    IFS=, read -r -a data_dirs <<< "$TRAIN_DATA_DIR,$VAL_DATA_DIR"  # several comma-separated sources are allowed
    for p in "${data_dirs[@]}" "$TOKENIZER_PATH"; do
        if [ -n "$p" ] && [ -e "$p" ]; then
            add_bind "$(dirname "$p")"
        fi
    done
    bind_list="$(IFS=,; echo "${binds[*]}")${LLAMMLEIN_BINDS:+,$LLAMMLEIN_BINDS}"
    # --nv: the host's NVIDIA driver and devices; --pwd: run from the bound checkout.
    LAUNCH=("$RUNTIME" exec --nv --bind "$bind_list" --pwd "$REPO_DIR" "$IMAGE" python)

    # The image has no Slurm. A stand-in `scontrol` first on the container's PATH turns the trainer's
    # `scontrol requeue` (rank 0, after its pre-emption checkpoint) into a request that this script carries out
    # once the trainer has exited. It lives in OUT_DIR, which every node sees and the container binds.
    relay_dir="$(realpath "$OUT_DIR")/.slurm-relay-$SLURM_JOB_ID"
    rm -rf "$relay_dir"
    mkdir -p "$relay_dir"
    cat > "$relay_dir/scontrol" <<RELAY
#!/bin/sh
if [ "\$1" = requeue ]; then
    touch "$relay_dir/requeue"
    echo "scontrol requeue \$2: requested from inside the container; the batch script requeues the job"
    exit 0
fi
echo "error: scontrol \$1 is not available inside the container" >&2
exit 1
RELAY
    # The same for the trainer's `sbatch` (--eval_submit_slurm): the stand-in writes its arguments as a request and
    # waits for the answer of relay_submissions below, which runs the real sbatch on this host.
    cat > "$relay_dir/sbatch" <<RELAY
#!/bin/bash
request="$relay_dir/submit-\$\$-\$RANDOM"
printf '%s\\0' "\$PWD" "\$@" > "\$request.tmp" && mv "\$request.tmp" "\$request.req"
for _ in \$(seq 600); do
    if [ -e "\$request.rc" ]; then
        cat "\$request.out"
        cat "\$request.err" >&2
        status=\$(cat "\$request.rc")
        rm -f "\$request".*
        exit "\$status"
    fi
    sleep 0.2
done
rm -f "\$request".*
echo "sbatch: the batch script outside the container did not answer within 120 s" >&2
exit 1
RELAY
    chmod +x "$relay_dir/scontrol" "$relay_dir/sbatch"
    case "$(basename "$RUNTIME")" in
        apptainer) export APPTAINERENV_PREPEND_PATH="$relay_dir" ;;
        *) export SINGULARITYENV_PREPEND_PATH="$relay_dir" ;;
    esac
fi

# Runs the sbatch requests of the container's stand-in (see above) until the trainer exits, each outside the
# training job's Slurm environment (SLURM_CONF, which names the cluster, stays).
relay_submissions() {
    local request base status name
    local -a args
    while :; do
        for request in "$relay_dir"/*.req; do
            [ -e "$request" ] || continue
            base="${request%.req}"
            mapfile -d '' -t args < "$request"
            rm -f "$request"
            status=0
            (
                for name in $(compgen -e); do
                    case "$name" in SLURM_CONF) ;; SLURM_*|SRUN_*) unset "$name" ;; esac
                done
                cd "${args[0]}" && exec sbatch "${args[@]:1}"
            ) > "$base.out" 2> "$base.err" || status=$?
            echo "$status" > "$base.rc.tmp"
            mv "$base.rc.tmp" "$base.rc"
        done
        sleep 0.5
    done
}
relay_pid=""
if [ -n "${relay_dir:-}" ]; then
    relay_submissions &
    relay_pid=$!
fi

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_JOB_NUM_NODES node(s) x" \
     "$SLURM_NTASKS_PER_NODE task(s), master $MASTER_ADDR:$MASTER_PORT, model $MODEL_NAME, out $OUT_DIR"
# srun starts one trainer per task (SLURM_PROCID = global rank); --kill-on-bad-exit ends the step when one rank
# dies instead of leaving the others hanging in a collective.
status=0
# Hang reports written after this moment are this run's (an older one may name a node that is fine by now).
run_started="$(mktemp)"
trap 'rm -f "$run_started"' EXIT
# (${EXTRA[@]+...}: bash before 4.4 calls an empty array unbound under set -u.)
srun --kill-on-bad-exit=1 "${LAUNCH[@]}" "${TRAINER[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$@" || status=$?
echo "[$(date -Is)] job $SLURM_JOB_ID: trainer exited with status $status"
if [ -n "$relay_pid" ]; then
    kill "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
fi

if [ -n "${relay_dir:-}" ]; then
    requested=0
    if [ -e "$relay_dir/requeue" ]; then
        requested=1
    fi
    rm -rf "$relay_dir"
    if [ "$requested" = 1 ]; then
        echo "[$(date -Is)] job $SLURM_JOB_ID: requeueing (the trainer checkpointed after a pre-emption signal)"
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi

# ---- hang: exclude the reported node(s) and requeue ----------------------------------------------------------------
HANG_EXIT_CODE=75  # lit_gpt/watchdog.py
# srun reports the status of the task that ended it; once the first rank exits, the others are killed (SIGTERM: 143),
# so the fresh report is the sign of a hang as much as the exit code.
hang_nodes_file="$(find "$OUT_DIR" -mindepth 2 -maxdepth 2 -path '*/hang-*/exclude_nodes' -newer "$run_started" \
                   2>/dev/null | sort | tail -n 1 || true)"
if [ "$status" = "$HANG_EXIT_CODE" ] || [ -n "$hang_nodes_file" ]; then
    hang_nodes="$(cat "$hang_nodes_file" 2>/dev/null || true)"
    if [ -z "$hang_nodes" ]; then
        echo "[$(date -Is)] job $SLURM_JOB_ID: a training step hung, but no node was named; not requeueing" >&2
        exit "$HANG_EXIT_CODE"
    fi
    excluded="$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' || true)"
    excluded="${excluded#ExcNodeList=}"
    if [ "$excluded" = "(null)" ]; then
        excluded=""
    fi
    excluded="${excluded:+$excluded,}$hang_nodes"
    echo "[$(date -Is)] job $SLURM_JOB_ID: a training step hung on $hang_nodes (report: $(dirname "$hang_nodes_file"));" \
         "requeueing without node(s) $excluded"
    # A running job's ExcNodeList cannot change, and a requeue ends this script at once. So a one-core helper job
    # waits until this job is pending (requeued on hold), sets the exclusion and releases it.
    helper="for i in \$(seq 600); do case \"\$(scontrol show job $SLURM_JOB_ID)\" in *JobState=PENDING*) break ;; esac;"
    helper+=" sleep 1; done; scontrol update JobId=$SLURM_JOB_ID ExcNodeList=$excluded; scontrol release $SLURM_JOB_ID"
    if sbatch --job-name="exclude-nodes-$SLURM_JOB_ID" --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=15 \
              --output="$(dirname "$hang_nodes_file")/exclude-nodes-%j.out" \
              ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
              ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} --wrap "$helper"; then
        scontrol requeuehold "$SLURM_JOB_ID"
    else
        echo "warning: could not submit the job that excludes $hang_nodes; requeueing without excluding them" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status"
fi
exit $status
