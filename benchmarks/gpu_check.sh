#!/usr/bin/env bash
# The GPU check: everything tlp does only on CUDA, in one run of at most 8 minutes on a
# single GPU with 16 CPU cores, so that a GPU lent for a few minutes is enough.
#
#   benchmarks/gpu_check.sh OUT [--dry-run] [--python PY] [--venv DIR] [--wheels DIR]
#
# Steps (each timed; the log and one JSON go into OUT):
#   1. venv: DIR (default .venv-gpu in the checkout) with the CUDA build of the pinned
#      torch/torchvision from the package registry (PyPI's Linux wheels are CUDA builds)
#      and tlp[test,models]; kept and reused when it already imports a CUDA torch.
#      Offline (the registry does not answer within seconds), DIR/bin/python is instead the
#      machine's own python3 and its CUDA torch, with what that python lacks installed from
#      --wheels DIR (pip --no-index) into DIR/site and tlp linked from the checkout; the
#      JSON names the torch that ran.
#   2. facts: nvidia-smi, torch's CUDA version, device name and capability, GPU count.
#   3. tests: `pytest -m gpu` (autocast fp32/bf16/fp16 features against the CPU's, pinned
#      memory with DataLoader workers, fp16 fine-tuning with a gradient scaler and its
#      resume; with 2+ GPUs, `torchrun --nproc-per-node 2 -m tlp finetune` on nccl against
#      one GPU of the global batch).
#   4. benchmark: benchmarks/extract.py --device cuda --batch-size 256 on 1,024 small
#      photos (the limit for fp32/bf16/fp16, the naive script, tlp cold and warm).
#   5. scale-out, with 2+ GPUs: benchmarks/scale.py --device cuda on 1,024 photos (one GPU
#      against 2 torchrun ranks, one GPU each; assembly of 50,000 rows).
# Output: OUT/gpu_check.json (every step's seconds, status and figures), OUT/gpu_check.log
# (everything printed), OUT/extract_cuda.json (the benchmark's own report) and, with 2+
# GPUs, OUT/scale_cuda.json.
#
# --dry-run prints what each step would run and runs the CPU part here: the gpu tests
# (collected, skipped without CUDA) and the benchmark at a tiny size on the CPU, through
# the same code paths, so the JSON is checked before a GPU is ever lent. It uses the
# checkout's .venv (made by `make setup`) unless --python names an interpreter.
set -uo pipefail

usage() { echo "usage: $0 OUT [--dry-run] [--python PY] [--venv DIR] [--wheels DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY_RUN=0; PY=""; VENV=""; WHEELS=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --python) [ $# -ge 2 ] || usage; PY=$2; shift ;;
        --venv) [ $# -ge 2 ] || usage; VENV=$2; shift ;;
        --wheels) [ $# -ge 2 ] || usage; WHEELS=$(cd "$2" 2>/dev/null && pwd) || { echo "gpu_check: no folder $2 (--wheels)" >&2; exit 2; }; shift ;;
        *) usage ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
cd "$ROOT" || exit 1
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"  # the Makefile's pins
STARTED=$(date +%s)
STEPS=()  # JSON fragments, one per step

say() { echo "$*" | tee -a "$LOG"; }
step_json() {  # name status seconds [extra JSON members]
    STEPS+=("\"$1\": {\"status\": \"$2\", \"seconds\": $3${4:+, $4}}")
}
run_step() {  # name timeout command...: run, log, time; sets STEP_STATUS and STEP_SECONDS
    local name=$1 limit=$2; shift 2
    say "== $name: $*"
    local t0=$(date +%s)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    STEP_SECONDS=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then STEP_STATUS=ok; elif [ $rc -eq 124 ]; then STEP_STATUS=timeout; else STEP_STATUS="failed (exit $rc)"; fi
    say "== $name: $STEP_STATUS in ${STEP_SECONDS}s"
}

registry_answers() {  # can pip reach its index within seconds? (a lent GPU may be offline)
    local probe rc
    probe=$(mktemp -d) || return 1
    timeout 30 python3 -m pip download --quiet --no-deps --retries 0 --timeout 5 --dest "$probe" pip >/dev/null 2>&1
    rc=$?
    rm -rf "$probe"
    return $rc
}
offline_venv() {  # VENV/bin/python: python3 (its CUDA torch) with --wheels and tlp on its path
    python3 -c "import torch" || { echo "python3 has no torch and the registry is out of reach"; return 1; }
    # No venv module: python3 may itself be a venv whose packages a new venv would not see,
    # or lack ensurepip. A folder on PYTHONPATH holds what python3 lacks, and tlp is the
    # checkout's pipeline/ folder (setup.cfg's package_dir), linked, so nothing is built.
    local site_dir=$VENV/site real
    real=$(python3 -c "import sys; print(sys.executable)") || return 1
    mkdir -p "$site_dir" "$VENV/bin" || return 1
    if [ -n "$WHEELS" ]; then
        python3 -m pip install --quiet --no-index --no-deps --target "$site_dir" "$WHEELS"/*.whl || return 1
    fi
    ln -sfn "$ROOT/pipeline" "$site_dir/tlp" || return 1
    printf '#!/bin/sh\nexport PYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}"\nexec "%s" "$@"\n' "$site_dir" "$real" > "$PY" || return 1
    chmod +x "$PY" || return 1
    "$PY" -c "import tlp, torch; print('tlp', tlp.__version__, 'on torch', torch.__version__, 'cuda', torch.version.cuda)"
}
export -f offline_venv

# ----------------------------------------------------------------------------- 1. venv
if [ $DRY_RUN -eq 1 ]; then
    PY=${PY:-$ROOT/.venv/bin/python}
    say "dry run: would build ${VENV:-$ROOT/.venv-gpu}: python3 -m venv; pip install $TORCH_PINS; pip install -e .[test,models] (offline: python3's own torch, with --wheels)"
    if [ ! -x "$PY" ]; then
        run_step venv 900 make setup
        step_json venv "$STEP_STATUS" "$STEP_SECONDS" "\"python\": \"$PY\", \"dry_run\": true"
    else
        step_json venv "skipped (dry run)" 0 "\"python\": \"$PY\", \"dry_run\": true"
    fi
elif [ -n "$PY" ]; then
    step_json venv "skipped (--python)" 0 "\"python\": \"$PY\""
else
    VENV=${VENV:-$ROOT/.venv-gpu}
    PY=$VENV/bin/python
    if [ -x "$PY" ] && "$PY" -c "import torch, tlp; assert torch.version.cuda" >/dev/null 2>&1; then
        step_json venv "reused" 0 "\"python\": \"$PY\""
        say "== venv: reusing $VENV"
    elif registry_answers; then
        run_step venv 420 bash -c "python3 -m venv '$VENV' && '$PY' -m pip install --quiet --upgrade pip \
            && '$PY' -m pip install --quiet $TORCH_PINS && '$PY' -m pip install --quiet -e '.[test,models]'"
        step_json venv "$STEP_STATUS" "$STEP_SECONDS" "\"python\": \"$PY\", \"source\": \"registry\""
        say "building the venv took ${STEP_SECONDS}s"
    else
        say "== venv: the package registry does not answer; building on python3's own torch"
        export VENV PY WHEELS ROOT
        run_step venv 180 bash -c offline_venv
        step_json venv "$STEP_STATUS" "$STEP_SECONDS" "\"python\": \"$PY\", \"source\": \"offline: python3's torch${WHEELS:+, wheels from $WHEELS}\""
        say "building the venv took ${STEP_SECONDS}s"
    fi
fi

# ----------------------------------------------------------------------------- 2. facts
FACTS=$("$PY" - <<'EOF' 2>>"$LOG"
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
    "gpu_count": torch.cuda.device_count() if cuda else 0,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
}))
EOF
)
FACTS=${FACTS:-'{"error": "python or torch failed to start; see the log"}'}
say "facts: $FACTS"
command -v nvidia-smi >/dev/null && nvidia-smi >> "$LOG" 2>&1
# From the facts above, not a second torch start each.
CUDA=$(echo "$FACTS" | "$PY" -c "import json, sys; print(int(bool(json.load(sys.stdin).get('cuda_available'))))" 2>/dev/null || echo 0)
GPUS=$(echo "$FACTS" | "$PY" -c "import json, sys; print(int(json.load(sys.stdin).get('gpu_count') or 0))" 2>/dev/null || echo 0)
if [ $DRY_RUN -eq 0 ] && [ "$CUDA" != 1 ]; then
    say "gpu_check: $PY's torch sees no CUDA device; run with --dry-run on a machine without one"
fi

# ----------------------------------------------------------------------------- 3. tests
run_step tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
SUMMARY=$(grep -E "^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|skipped)" "$LOG" | tail -1 | tr -d '=' | xargs)
step_json tests "$STEP_STATUS" "$STEP_SECONDS" "\"summary\": \"$SUMMARY\""
if [ "$GPUS" -ge 2 ]; then
    step_json ddp "in the tests step (nccl, 2 of $GPUS GPUs)" 0 "\"gpus\": $GPUS"
else
    say "ddp: $GPUS GPU(s): the nccl fine-tuning test needs 2 and is skipped (tests/test_ddp.py runs gloo on the CPU)"
    step_json ddp "skipped (needs 2 GPUs)" 0 "\"gpus\": $GPUS"
fi

# ----------------------------------------------------------------------------- 4. benchmark
if [ $DRY_RUN -eq 1 ]; then
    say "dry run: would run benchmarks/extract.py --device cuda --batch-size 256 --n-images 1024 --repeats 2"
    BENCH=(--device cpu --batch-size 8 --n-images 16 --repeats 1 --bare-repeats 1 --warm-repeats 1)
else
    BENCH=(--device cuda --batch-size 256 --n-images 1024 --repeats 2 --bare-repeats 3 --warm-repeats 2)
fi
run_step benchmark 300 "$PY" benchmarks/extract.py "${BENCH[@]}" --json "$OUT/extract_cuda.json"
FIGURES=$("$PY" - "$OUT/extract_cuda.json" <<'EOF' 2>>"$LOG"
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("{}"); raise SystemExit
keys = ("bare_forward_images_per_s", "bare_forward_best_variant", "tlp_cold_images_per_s", "naive_images_per_s",
        "tlp_warm_seconds", "ratio_cold_vs_limit", "ratio_cold_vs_naive", "tlp_cold_precision", "targets_met")
print(json.dumps({k: report.get(k) for k in keys}))
EOF
)
FIGURES=${FIGURES:-"{}"}
step_json benchmark "$STEP_STATUS" "$STEP_SECONDS" "\"figures\": $FIGURES"

# ----------------------------------------------------------------------------- 5. scale-out (2+ GPUs)
# Sharded extraction on 2 GPUs against one (benchmarks/scale.py, issue 12's first GPU figure).
SCALE=(--device cuda --n-images 1024 --repeats 1 --assemble-rows 50000)
if [ $DRY_RUN -eq 1 ]; then
    say "dry run: with 2+ GPUs would run benchmarks/scale.py ${SCALE[*]}"
    step_json scale "skipped (dry run)" 0
elif [ "$GPUS" -ge 2 ]; then
    run_step scale 150 "$PY" benchmarks/scale.py "${SCALE[@]}" --json "$OUT/scale_cuda.json"
    step_json scale "$STEP_STATUS" "$STEP_SECONDS"
else
    step_json scale "skipped (needs 2 GPUs)" 0
fi

# ----------------------------------------------------------------------------- report
TOTAL=$(( $(date +%s) - STARTED ))
{
    echo "{"
    echo "  \"dry_run\": $([ $DRY_RUN -eq 1 ] && echo true || echo false),"
    echo "  \"total_seconds\": $TOTAL,"
    echo "  \"facts\": $FACTS,"
    echo "  \"steps\": {"
    for i in "${!STEPS[@]}"; do
        sep=","; [ "$i" -eq $(( ${#STEPS[@]} - 1 )) ] && sep=""
        echo "    ${STEPS[$i]}$sep"
    done
    echo "  }"
    echo "}"
} > "$OUT/gpu_check.json"
"$PY" -m json.tool "$OUT/gpu_check.json" > /dev/null || { echo "gpu_check: wrote invalid JSON to $OUT/gpu_check.json" >&2; exit 1; }
say "wrote $OUT/gpu_check.json and $LOG in ${TOTAL}s"
grep -q '"status": "failed\|"status": "timeout' "$OUT/gpu_check.json" && exit 1
exit 0
