#!/bin/bash
# Curate an LVD-style dataset on a SLURM allocation: a Ray head on the first node, a Ray worker on
# every other node, then pipelines/build_lvd.py on the first node, joined to that cluster with
# --ray-address. Submit from the repository root, with build_lvd.py's arguments:
#
#   sbatch slurm/curate_ray.sh --seeds imagenet --urls /data/urls.parquet --out runs/lvd
#   sbatch --nodes=8 --partition=cpu --account=vision slurm/curate_ray.sh --seeds imagenet --urls ... --out ...
#
# Environment (sbatch hands the submitting shell's environment to the job):
#   PYTHON    interpreter with the project installed (default .venv/bin/python); ray is the one next to it
#   RAY_PORT  port of the Ray head (default 6379); choose another below 10000 (Ray's workers take
#             10002-19999) when two clusters share a node
#
# Every stage of build_lvd.py resumes: submitting the same command again continues the run. The log
# (slurm-curate-<job id>.out in the submission folder) holds the Ray nodes' output, then the
# pipeline's; Ray's own files go to /tmp/ray-<job id> on each node. See docs/slurm.md.
#SBATCH --job-name=curate
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?run this through sbatch, from the repository root}"
PYTHON=${PYTHON:-.venv/bin/python}
RAY=$(dirname "$PYTHON")/ray
PORT=${RAY_PORT:-6379}
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
TEMP=/tmp/ray-$SLURM_JOB_ID
export RAY_USAGE_STATS_ENABLED=0
# A token of this job's own: only its processes (head, workers, the pipeline) can join the cluster.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 --overlap -w "$head_node" hostname --ip-address | awk '{print $1}')
address=$head_ip:$PORT
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # the Ray steps end with the pipeline

echo "Ray head on $head_node ($address), workers on: ${nodes[*]:1}" >&2
srun --nodes=1 --ntasks=1 --overlap -w "$head_node" "$RAY" start --head --block --node-ip-address="$head_ip" \
  --port="$PORT" --num-cpus="$CPUS" --include-dashboard=false --temp-dir="$TEMP" &
head_step=$!
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 --overlap -w "$node" "$RAY" start --block --address="$address" \
    --num-cpus="$CPUS" --temp-dir="$TEMP" &
done

# Until every node has joined (seconds per node; give up after 5 minutes or when the head has died).
"$PYTHON" - "$address" "${#nodes[@]}" "$head_step" <<'PY'
import os, socket, sys, time
import ray
address, expected, head_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
host, port = address.rsplit(":", 1)
deadline = time.monotonic() + 300
alive = 0
while time.monotonic() < deadline:
    try:
        os.kill(head_step, 0)
    except ProcessLookupError:
        sys.exit(f"error: the Ray head did not start (its output is above); a port in use? set RAY_PORT")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        time.sleep(1)
        continue
    ray.init(address=address, logging_level="ERROR")
    alive = sum(node["Alive"] for node in ray.nodes())
    ray.shutdown()
    if alive >= expected:
        print(f"Ray cluster at {address}: {alive} nodes", file=sys.stderr)
        sys.exit(0)
    time.sleep(2)
sys.exit(f"error: {alive} of {expected} Ray nodes joined {address} within 5 minutes; see the output above")
PY

"$PYTHON" pipelines/build_lvd.py --ray-address "$address" "$@"
