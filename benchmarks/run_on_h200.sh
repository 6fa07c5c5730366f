#!/usr/bin/env bash
# benchmarks/gpu_e4b.py on a lent H200, as one command of the device tool:
#
#     run(command="bash benchmarks/run_on_h200.sh", timeout_s=480)
#
# One shot at a lease of 15 device minutes (machine start included): the script's own budget is
# 300 s and a hard stop at 390 s, so a second call (a rerun with --skip or a smaller budget, on the
# still-warm machine that keeps the checkpoint) fits in what is left. The smoke section runs
# first and takes ~20 s: if it shows a broken path, stop there (--time-budget-s 40).
#
# Owns the machine-side setup, and nothing else: the image's own python3 (CUDA torch,
# transformers, accelerate, safetensors, tokenizers, nvidia-ml-py; nothing can be installed there,
# and the server's HTTP dependencies are not needed), the repository on PYTHONPATH instead of
# `pip install -e .` (pip would try to resolve our dependencies against an unreachable registry),
# a record of the machine, and a hard stop before the tool's 600 s limit so that the log and the
# table under $OUT come back either way. Reads nothing from outside the repository.
#
# Extra arguments go to gpu_e4b.py (e.g. --time-budget-s 200 --skip smoke for a rerun). The
# checkpoint (13.75 GB) goes to concentric-gpu/ on whichever of /tmp, /var/tmp and $HOME has the
# most free space (or $WORK): a rerun within the 30 s the machine stays warm reuses it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the image's python3; PYTHON=... to try the script elsewhere
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -z "${WORK:-}" ]; then
    most=0
    for dir in /tmp /var/tmp "${HOME:-/root}"; do
        [ -d "$dir" ] && [ -w "$dir" ] || continue
        avail=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
        if [ "${avail:-0}" -gt "$most" ]; then most=$avail WORK=$dir/concentric-gpu; fi
    done
fi
WORK="${WORK:-/tmp/concentric-gpu}"

{
    date -u
    echo "work folder: $WORK"
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version \
        --format=csv || true
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__,
torch.version.cuda, torch.cuda.is_available(), transformers.__version__)'
    nproc
    free -g
    df -h /tmp /var/tmp "${HOME:-/root}"
} 2>&1 | tee "$OUT/machine.txt"

timeout --kill-after=10 390 "$PY" benchmarks/gpu_e4b.py --scale e4b --device cuda \
    --dtype bfloat16 --out "$OUT" --work "$WORK" --time-budget-s 300 "$@" \
    2>&1 | tee "$OUT/gpu_e4b.log"
status=${PIPESTATUS[0]}
echo "gpu_e4b.py exit status $status"
exit "$status"
