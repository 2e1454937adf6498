#!/bin/bash
# Start a Ray cluster on a SLURM allocation (one Ray node per SLURM node) and run `dist-fair train`
# (or the command named by DIST_FAIR_COMMAND, e.g. `scale`) on it. Arguments are passed to that
# command, with --address pointing at the allocation's Ray head:
#
#   sbatch launch/slurm.sh --config launch/configs/default.yaml \
#       --set train.model=probe --set train.workers=4 --set train.cpus_per_worker=8
#   sbatch --gres=gpu:4 launch/slurm.sh --set train.model=probe --set train.workers=8 \
#       --set train.deepspeed=zero2_gpu --set train.precision=bf16        # GPUs: nccl, bf16
#   DIST_FAIR_COMMAND=scale sbatch --nodes=4 launch/slurm.sh --out /shared/scale \
#       --sizes 100000,300000,1000000,3000000 --workers 1,2,4,8 --results /shared/scale/scale_slurm
#                                                                         # a scaling study
#
# Environment (optional): DIST_FAIR_REPO (default: the submit folder), DIST_FAIR_VENV (default:
# $DIST_FAIR_REPO/.venv, created once with `make install` and `dist-fair train --build-ops`),
# RUN_DIR (default: $DIST_FAIR_REPO/runs/slurm-$SLURM_JOB_ID; train only), RAY_PORT (default 6379),
# DIST_FAIR_COMMAND (default train; any dist-fair command that takes --address: scale, knn, run ...).
# RUN_DIR and the repository must be on storage shared by all nodes (checkpoints, metrics and the
# trained model are written there by whichever node holds the worker) - see launch/README.md.
#
#SBATCH --job-name=dist-fair-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

REPO=${DIST_FAIR_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
VENV=${DIST_FAIR_VENV:-$REPO/.venv}
RUN_DIR=${RUN_DIR:-$REPO/runs/slurm-${SLURM_JOB_ID:-manual}}
PORT=${RAY_PORT:-6379}
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
GPUS=$(echo "${SLURM_GPUS_ON_NODE:-0}" | grep -Eo '^[0-9]+' || echo 0)

export RAY_USAGE_STATS_ENABLED=0
# The DeepSpeed op cache lives in the shared venv (built once by `dist-fair train --build-ops`).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" hostname --ip-address | awk '{print $1}')
echo "dist_fair: Ray head on $HEAD ($HEAD_IP:$PORT), ${#NODES[@]} node(s), $CPUS CPU(s) and $GPUS GPU(s) each"

srun --nodes=1 --ntasks=1 --overlap -w "$HEAD" \
    "$VENV/bin/ray" start --head --block --node-ip-address="$HEAD_IP" --port="$PORT" \
    --num-cpus="$CPUS" --num-gpus="$GPUS" --include-dashboard=false --resources='{"node_head":1}' &
RAY_PIDS=($!)
sleep 5
for node in "${NODES[@]:1}"; do
    srun --nodes=1 --ntasks=1 --overlap -w "$node" \
        "$VENV/bin/ray" start --block --address="$HEAD_IP:$PORT" \
        --num-cpus="$CPUS" --num-gpus="$GPUS" --resources='{"node_worker":1}' &
    RAY_PIDS+=($!)
done

cleanup() {
    srun --nodes="${#NODES[@]}" --ntasks-per-node=1 --overlap "$VENV/bin/ray" stop --force >/dev/null 2>&1 || true
    kill "${RAY_PIDS[@]}" 2>/dev/null || true
}
trap cleanup EXIT

# Wait (up to 5 minutes) until every node has joined.
"$VENV/bin/python" - "$HEAD_IP:$PORT" "${#NODES[@]}" <<'EOF'
import sys, time
import ray
address, expected = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300
while True:
    try:
        ray.init(address=address, logging_level="ERROR")
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        ray.shutdown()
    except Exception as err:  # head not up yet
        alive = 0
    if alive >= expected:
        print(f"dist_fair: {alive} Ray node(s) up")
        break
    if time.time() > deadline:
        sys.exit(f"dist_fair: only {alive} of {expected} Ray nodes joined within 5 minutes")
    time.sleep(5)
EOF

COMMAND=${DIST_FAIR_COMMAND:-train}
if [ "$COMMAND" = train ]; then
    mkdir -p "$RUN_DIR"
    "$VENV/bin/dist-fair" train --address "$HEAD_IP:$PORT" --run-dir "$RUN_DIR" "$@"
else
    "$VENV/bin/dist-fair" "$COMMAND" --address "$HEAD_IP:$PORT" "$@"
fi
