#!/usr/bin/env bash
# The GPU checks, in one run, for a lent one-GPU machine (its python3 holds a CUDA build of torch;
# Ray is not needed): tests/test_gpu.py; where a simulated round's time goes at N = 10,000 and
# 100,000 (benchmarks/sim_profile.py); the simulator end to end (evaluation every round, start-up,
# plots) at the same sizes, and against the plain per-client loop on the GPU at N = 1,000 and
# 10,000 (2 rounds: the loop takes ~1.6 ms a client step; LOOP_RUNS= skips it). Where the machine
# lets this process make network namespaces (root, `ip netns`), also issue 12's overlap cases on
# shaped 100 Mbit/s links (benchmarks/wan.py), on a machine whose spare cores can run the
# network stack beside the inner steps (WAN=0 skips them). Logs go to $OUT (default gpu-out/).
# DEVICE=cpu dry-runs it.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RAY_USAGE_STATS_ENABLED=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
          'cuda', torch.version.cuda, torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())"
} | tee "$out/env.txt"
echo "== tests/test_gpu.py"
timeout 150 $py -m pytest -p no:cacheprovider -q -rA --timeout 120 tests/test_gpu.py 2>&1 \
  | tee "$out/test_gpu.log"
echo "== benchmarks/sim_profile.py"
for n in ${PROFILE_NODES:-10000:50 100000:10}; do
  timeout 90 $py benchmarks/sim_profile.py --device "$dev" --nodes "${n%:*}" --rounds "${n#*:}" \
    --first-rounds 4 2>&1 | tee "$out/profile_${n%:*}.txt"
done
echo "== benchmarks/sim_end_to_end.py (simulator only, end to end)"
timeout 100 $py benchmarks/sim_end_to_end.py --device "$dev" --no-loop \
  --runs "${E2E_RUNS:-10000:20,100000:3}" 2>&1 | tee "$out/end_to_end.jsonl"
if [ -n "${LOOP_RUNS-1000:3,10000:2}" ]; then
  echo "== benchmarks/sim_end_to_end.py (against the per-client loop on the same device)"
  timeout 150 $py benchmarks/sim_end_to_end.py --device "$dev" \
    --runs "${LOOP_RUNS:-1000:3,10000:2}" 2>&1 | tee "$out/end_to_end_loop.jsonl"
fi
why=$($py -c "from benchmarks.netns import unavailable; print(unavailable() or '')" 2>&1)
if [ "${WAN:-1}" = 1 ] && [ -z "$why" ]; then
  echo "== benchmarks/wan.py (overlap on shaped links, $(nproc) cores)"
  timeout "${WAN_TIMEOUT:-150}" $py benchmarks/wan.py --world-sizes 2 --params 1 --repeats 4 \
    --inner-steps 60 --rounds 2 --cases compute,diloco+steps,diloco+overlap,noloco+overlap,\
diloco:int8+overlap,noloco:int8+overlap 2>&1 | tee "$out/wan_overlap.jsonl"
else
  echo "== benchmarks/wan.py skipped: ${why:-WAN=0}" | tee "$out/wan_overlap.jsonl"
fi
