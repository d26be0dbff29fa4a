#!/usr/bin/env bash
# The CUDA path in one prepared check, on one GPU in under 8 minutes:
#   1. tests   the tests marked `cuda` (both passes, both lowerings, bfloat16, torch.compile, host syncs)
#   2. syncs   benchmarks/sync_count.py: host syncs per training step, counted and (on a GPU) CUDA's own count
#   3. lds     benchmarks/lds_speed.py at the LLaVA-1.5-7B decoder slice (--shape llava7b), bfloat16
#   4. vtc     benchmarks/vtc_speed.py at the same slice
# then one summary table (each step's status, seconds and result line). Each step's output is kept in
# $DEVICE_CHECK_OUT (default benchmarks/out/device_check). Without CUDA, or with --dry-run, the same steps run on
# the CPU at CPU size (tiny models, few steps; the tests without those marked slow, which CI's slow run has run):
# CI runs that. It installs nothing but the project (pip install -e ".[test]"), into the Python that has torch.
#
#   benchmarks/device_check.sh [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then  # no torch here: a virtual environment as README.md makes one
    python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 || exit 1
    PYTHON=python
fi
if ! "$PYTHON" -c "import stsc, pytest" 2>/dev/null; then
    "$PYTHON" -m pip install -q -e ".[test]" || exit 1
fi
if [[ $dry == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device here: a dry run at CPU size"
    dry=1
fi

out=${DEVICE_CHECK_OUT:-benchmarks/out/device_check}
mkdir -p "$out"
if [[ $dry == 1 ]]; then
    tests=(-m "cuda and not slow")
    syncs=(--device cpu --layers 2)
    lds=(--device cpu --layers 2 --hidden 128 --heads 2 --intermediate 341 --steps 4 --warmup 1)
    vtc=(--device cpu --layers 2 --hidden 128 --heads 2 --intermediate 341 --image-size 112 --steps 2 --keep-ratios 0.25)
    limits=(400 300 300 300)  # about 45, 40, 35 and 35 s of CPU time on a quiet machine
else
    tests=(-m cuda)
    syncs=(--device cuda --layers 2 4)
    lds=(--device cuda --shape llava7b)
    vtc=(--device cuda --shape llava7b)
    limits=(240 60 80 90)  # 470 s at most: under 8 minutes with the set-up
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '|', torch.get_num_threads(), 'CPU threads')" | tee "$out/device.txt"

rows=()
failed=0
step() {  # step NAME LIMIT COMMAND...: run it, keep its output, and a summary row
    local name=$1 limit=$2
    shift 2
    local begin=$SECONDS status=ok
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    [[ $rc == 124 ]] && status="timeout" || { [[ $rc != 0 ]] && status="FAILED($rc)"; }
    [[ $status != ok ]] && failed=1
    tail -n 25 "$out/$name.log"
    local result
    result=$(grep -E "^RESULT |^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$out/$name.log" | tail -n 1)
    rows+=("$(printf "%-6s %-10s %7s  %s" "$name" "$status" "$((SECONDS - begin))" "${result#RESULT }")")
}

step tests "${limits[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
step syncs "${limits[1]}" "$PYTHON" benchmarks/sync_count.py "${syncs[@]}"
step lds "${limits[2]}" "$PYTHON" benchmarks/lds_speed.py "${lds[@]}"
step vtc "${limits[3]}" "$PYTHON" benchmarks/vtc_speed.py "${vtc[@]}"

echo
echo "== device check ($([[ $dry == 1 ]] && echo "dry run, CPU size" || echo "GPU")): $(cat "$out/device.txt")"
printf "%-6s %-10s %7s  %s\n" step status seconds result
printf "%s\n" "${rows[@]}"
exit $failed
