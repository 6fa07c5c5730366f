#!/usr/bin/env bash
# benchmarks/gpu_e4b.py on a lent H200, as one command of the device tool:
#
#     run(command="bash benchmarks/run_on_h200.sh", timeout_s=540, carry=[".whl"])
#
# A lease is 15 device minutes, machine starts included (~40 s each on 2026-12-04). The script's
# own budget is 420 s and its hard stop 480 s, so the whole run fits with a margin for one
# short rerun on a fresh machine. Seen on the first H200 runs (2026-12-04, the tiny scale): the
# smoke takes ~40 s, a tiny compiled bucket 9-17 s. To check the risky paths first, spend a
# minute at the tiny scale: `HARD_STOP_S=200 bash benchmarks/run_on_h200.sh --scale small
# --time-budget-s 170 --skip kernels,transformers,engine,residency --compiled-rows 1,4`.
#
# Owns the machine-side setup, and nothing else: the image's own python3 (CUDA torch,
# transformers, accelerate, safetensors, tokenizers, nvidia-ml-py; the server's HTTP dependencies
# are not needed), the repository on PYTHONPATH instead of
# `pip install -e .` (pip would try to resolve our dependencies against an unreachable registry),
# a record of the machine, and a hard stop before the tool's 600 s limit so that the log and the
# table under $OUT come back either way. Reads nothing from outside the repository.
#
# The image has no xgrammar (nor pydantic, which it needs), and nothing can be installed there from
# a registry: carry them as wheels, made here once (.whl/ is ignored through .git/info/exclude),
# with `carry=[".whl"]` in the call:
#
#     for p in xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 \
#             pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
#         python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#             --implementation cp --platform manylinux_2_28_x86_64 \
#             --platform manylinux_2_17_x86_64 -d .whl "$p"; done
#
# Extra arguments go to gpu_e4b.py (e.g. --time-budget-s 200 --skip smoke for a rerun; with a
# larger budget, HARD_STOP_S=... moves the hard stop). The
# checkpoint (13.75 GB) goes to concentric-gpu/ on whichever of /tmp, /var/tmp and $HOME has the
# most free space (or $WORK): a rerun within the 30 s the machine stays warm reuses it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the image's python3; PYTHON=... to try the script elsewhere
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# What the runtime imports and the image lacks (xgrammar and its pydantic), carried as wheels
# in .whl/ (see the header); installed into a folder of their own, the image left as it is.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/concentric-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/concentric-site"
fi
if ! "$PY" -c "import xgrammar" 2>/dev/null; then
    echo "run_on_h200.sh: no xgrammar on this machine: carry its wheels in .whl/ (see the header)" \
        | tee "$OUT/gpu_e4b.log" >&2
    exit 1
fi

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

timeout --kill-after=10 "${HARD_STOP_S:-480}" "$PY" benchmarks/gpu_e4b.py --scale e4b --device cuda \
    --dtype bfloat16 --out "$OUT" --work "$WORK" --time-budget-s 420 "$@" \
    2>&1 | tee "$OUT/gpu_e4b.log"
status=${PIPESTATUS[0]}
echo "gpu_e4b.py exit status $status"
exit "$status"
