#!/usr/bin/env bash
# The first checks on a GPU machine: every CUDA path of ShardFlow, run once, in under 8 minutes.
#
# How to run (from anywhere; it works in the repository root):
#   bash bench/gpu_check.sh                       # results in $OUT, else bench/results/gpu-<date>
#   PYTHON=/usr/bin/python3 bash bench/gpu_check.sh
#   BUDGET_S=300 bash bench/gpu_check.sh          # a shorter total budget (default 440 s)
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh  # tests this script without a GPU: every part
#                                                 # on the CPU, tiny sizes, figures meaningless
# Needs: a python whose torch has CUDA (PYTHON=...; default .venv/bin/python when it exists and
#   its torch sees CUDA, else python3), an NVIDIA GPU. No network: nothing is installed. Optional
#   packages are reported and the parts that need them say so: pytest (part 1 tests),
#   bitsandbytes (DolphinFlow8bit rows), safetensors (the runs' checkpoints), tqdm, matplotlib.
# How long: under 8 minutes of wall time by construction (about 4-5 expected): every part runs
#   under `timeout`, its limit the smaller of its own and what is left of BUDGET_S (440 s, counted
#   from the start) less a reserve for the parts after it; a part that fails or times out is
#   recorded and the next one runs.
# Writes under $OUT: gpu-check-summary.md (command, machine, date, each part's exit status,
#   seconds and figures), one <part>.log per part, the smoke test's and the benches' tables
#   (smoke-*.json, step-*.md), the training runs' metrics.jsonl / summary.json / loss.png (their
#   checkpoints stay in a temporary folder: too big to bring back).
#
# Parts, cheapest and most important first (the last two get whatever time is left):
#   0 preflight   torch version, CUDA available, device name, optional packages, nvidia-smi
#   1 tests       pytest -m "not slow" -k "cuda or pinned or projection_cache" over the test files
#                 that mention CUDA (tests/test_dolphinflow8bit.py::test_cuda_matches_cpu, ...)
#   1 smoke       bench/gpu_smoke.py: every optimizer 20 steps on a tiny CUDA model, fp32 and
#                 bf16 weights (Kahan), loss falls, no NaN, fp32 agrees with the CPU run (eager)
#   2 step        bench/gpu_step.py: step time on SmolLM2-135M shapes against fused AdamW and
#                 torch.optim.Muon, fp32 and bf16 weights (bench/step.py has no device option)
#   3 quickstart  launch/train.py configs/quickstart.toml on one GPU (placement none; 120 steps)
#   4 offload     placement offload: SmolLM2-135M when models/SmolLM2-135M holds real weights and
#                 transformers is installed, else the quickstart model (configs/hf/SmolLM2-135M
#                 is config-only: shardflow/train/hf.py loads weights and a tokenizer with
#                 from_pretrained for training, so it cannot train from it)
#   5 smoke-compiled / step-compiled   parts 1 and 2 with compiled=None (torch.compile on CUDA)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
START=$(date +%s)
BUDGET_S="${BUDGET_S:-440}"
DEADLINE=$((START + BUDGET_S))
STAMP="$(date -u +%Y-%m-%d)"
OUT="${OUT:-bench/results/gpu-$STAMP}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/gpu-check-summary.md"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/shardflow-gpu-check.XXXXXX")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DEV="${GPU_CHECK_DEVICE:-cuda}"
if [ "$DEV" = cpu ]; then  # test mode: tiny sizes
    SMOKE_ARGS=(--only dolphinflow-vector,dolphinflow8bit-vector,whiteflow,factored-adam)
    STEP_ARGS=(--layers 1 --vocab 1024 --steps 1 --warmup 1 --threads 1 --only adamw-fused,df-vector,df8-vector,whiteflow,factored-adam)
    QUICK_ARGS=(--train.steps 4 --train.eval_every 2 --checkpoint.every 2 --train.eval_batches 1)
    OFFLOAD_ARGS=("${QUICK_ARGS[@]}")
else
    SMOKE_ARGS=()
    STEP_ARGS=(--steps 20 --warmup 3)
    QUICK_ARGS=()
    OFFLOAD_ARGS=(--train.steps 40 --train.eval_every 20 --checkpoint.every 20)
fi

# -- the python ---------------------------------------------------------------------------------
PROBE='import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-", sep="|")'
probe() { timeout 120 "$1" -c "$PROBE" 2>"$2"; }
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
PROBED="$(probe "$PY" "$OUT/preflight.log")"
PROBE_RC=$?
# a carried .venv may hold a CPU-only torch: then the machine's python3, if its torch has CUDA
if [ -z "${PYTHON:-}" ] && [ "$PY" != python3 ] && [ "$DEV" = cuda ] && [[ "$PROBED" != *"|True|"* ]] \
    && command -v python3 >/dev/null; then
    OTHER="$(probe python3 "$SCRATCH/probe-python3.log")" && [[ "$OTHER" == *"|True|"* ]] && {
        echo "gpu_check: $PY's torch has no CUDA here; python3's has: using python3"
        PY=python3 PROBED="$OTHER" PROBE_RC=0
    }
fi
echo "gpu_check: python $PY; results in $OUT"
IFS='|' read -r TORCH_VERSION CUDA_OK DEVICE_NAME <<<"$PROBED"
echo "torch.__version__ = ${TORCH_VERSION:-?}"
echo "torch.cuda.is_available() = ${CUDA_OK:-?}"
echo "device = ${DEVICE_NAME:-?}"
SMI="$(command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4)"

{
    echo "# GPU check ($STAMP)"
    echo
    COMMIT="$(git rev-parse --short HEAD 2>/dev/null)" \
        && { git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT + uncommitted changes"; }
    echo "- command: \`$0 $*\` (PYTHON=$PY, BUDGET_S=$BUDGET_S, GPU_CHECK_DEVICE=$DEV) at commit ${COMMIT:-? (no git)}"
    echo "- machine: ${SMI:-no nvidia-smi}; $(nproc 2>/dev/null) CPU cores; $(uname -srm)"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- torch ${TORCH_VERSION:-?}, torch.cuda.is_available() = ${CUDA_OK:-?}, device ${DEVICE_NAME:-?}"
} >"$SUMMARY"

if [ "$DEV" = cpu ]; then
    echo "- **test mode** (GPU_CHECK_DEVICE=cpu): every part on the CPU with tiny sizes; the figures mean nothing" >>"$SUMMARY"
elif [ "$PROBE_RC" -ne 0 ] || [ "${CUDA_OK:-}" != "True" ]; then
    {
        echo
        echo "**CUDA is not available** to $PY (probe exit $PROBE_RC): nothing else was run."
        echo
        [ -s "$OUT/preflight.log" ] && { echo '```'; tail -5 "$OUT/preflight.log"; echo '```'; }
    } >>"$SUMMARY"
    echo "gpu_check: CUDA is not available to $PY (torch ${TORCH_VERSION:-not importable}); stopping." >&2
    echo "gpu_check: pick a python with CUDA torch: PYTHON=/path/to/python bash bench/gpu_check.sh" >&2
    rm -rf "$SCRATCH"
    exit 3
fi

# optional packages, one line each
timeout 60 "$PY" - >>"$OUT/preflight.log" 2>&1 <<'EOF'
import importlib, platform, torch
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| capability", torch.cuda.get_device_capability() if cuda else "-",
      "| bf16", torch.cuda.is_bf16_supported() if cuda else "-")
for name in ("triton", "bitsandbytes", "safetensors", "pytest", "numpy", "transformers", "tqdm", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as exc:
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
EOF
have() { grep -q "^$1: [0-9a-z]" "$OUT/preflight.log"; }
{
    echo "- packages: $(grep -E '^(python|triton|bitsandbytes|safetensors|pytest|numpy|transformers|tqdm|matplotlib)' "$OUT/preflight.log" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
    echo
    echo "| part | exit | seconds | limit s | figures |"
    echo "|---|---:|---:|---:|---|"
} >>"$SUMMARY"
DETAILS="$SCRATCH/details.md"
: >"$DETAILS"

# -- running a part -----------------------------------------------------------------------------
# part NAME LIMIT_S RESERVE_S FIGURES_FN -- COMMAND...: run under timeout min(LIMIT_S, time left
# minus RESERVE_S for the parts after it); log to $OUT/NAME.log; one summary row.
part() {
    local name=$1 limit=$2 reserve=$3 figures=$4
    shift 5
    local now left rc t0 secs
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "| $name | – | – | – | skipped: no time left in the ${BUDGET_S} s budget |" >>"$SUMMARY"
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    t0=$(date +%s)
    timeout -k 3 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="TIMED OUT; "
    echo "| $name | $rc | $secs | $limit | $note$($figures "$name" | tr '\n' ' ' | sed 's/|/\\|/g') |" >>"$SUMMARY"
    {
        echo
        echo "## $name (exit $rc, $secs s)"
        echo
        echo "\`$*\`"
        echo
        "${figures}_details" "$name" 2>/dev/null || tail -25 "$OUT/$name.log" | sed 's/^/    /'
        echo
    } >>"$DETAILS"
    echo "   exit $rc after $secs s"
}
skip_row() { echo "| $1 | – | – | – | skipped: $2 |" >>"$SUMMARY"; echo "== $1: skipped ($2)"; }

# figures: one line for the table; *_details: the block under the table
tests_fig() { grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/$1.log" | tail -1; grep -c 'needs a CUDA device' "$OUT/$1.log" | sed 's/^0$//; s/^\([1-9][0-9]*\)$/(\1 skipped for want of CUDA!)/'; }
tests_fig_details() { grep -E '^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed' "$OUT/$1.log" | tail -20 | sed 's/^/    /'; }
smoke_fig() { grep -E '^gpu_smoke: [0-9]+ failing' "$OUT/$1.log" || tail -1 "$OUT/$1.log"; }
smoke_fig_details() { grep -E '^\|' "$OUT/$1.log"; grep -E '^gpu_smoke: [0-9]' "$OUT/$1.log"; }
# x fused AdamW per row, per weight dtype
step_fig() {
    awk -F'|' '/^### weights/ {printf "%s: ", $0 ~ /bf16/ ? "bf16" : "fp32"}
        /^\| (df-|df8-|whiteflow|factored|muon)/ {gsub(/ /,"",$2); gsub(/ /,"",$7); printf "%s %sx; ", $2, $7}' "$OUT/$1.log"
    grep -q Traceback "$OUT/$1.log" && tail -1 "$OUT/$1.log"
}
step_fig_details() {
    if [ -s "$OUT/$1.md" ]; then sed -n '/^### /,$p' "$OUT/$1.md"; else tail -25 "$OUT/$1.log" | sed 's/^/    /'; fi
}
train_fig() {
    local s="$SCRATCH/$1/summary.json"
    if [ -f "$s" ]; then "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('; '.join(f'{k}={v}' for k,v in d.items() if not isinstance(v,(dict,list)))[:600])" "$s"
    else grep -vE '^\s*$' "$OUT/$1.log" | tail -1; fi
}
train_fig_details() {
    for f in metrics.jsonl summary.json loss.png; do [ -f "$SCRATCH/$1/$f" ] && cp "$SCRATCH/$1/$f" "$OUT/$1-$f"; done
    grep -E 'val|loss|step' "$OUT/$1.log" | tail -8 | sed 's/^/    /'
    [ -f "$SCRATCH/$1/summary.json" ] && sed 's/^/    /' "$SCRATCH/$1/summary.json" | head -40
    echo
}

# -- 1: CUDA tests and the smoke test -----------------------------------------------------------
CUDA_TESTS=$(grep -lis cuda tests/test_*.py | tr '\n' ' ')
if have pytest; then
    # no -x: each test's result is wanted, and there are few
    part tests 60 200 tests_fig -- "$PY" -m pytest -q -rA -p no:cacheprovider -m "not slow" \
        -k "cuda or pinned or projection_cache" --junitxml "$OUT/tests.xml" $CUDA_TESTS
else
    skip_row tests "pytest is not installed for $PY (the smoke test below still runs)"
fi
part smoke 75 155 smoke_fig -- "$PY" -m bench.gpu_smoke --device "$DEV" --compiled off \
    --json "$OUT/smoke-eager.json" "${SMOKE_ARGS[@]}"

# -- 2: step time on the GPU --------------------------------------------------------------------
part step 80 110 step_fig -- "$PY" -m bench.gpu_step --device "$DEV" --compiled off \
    --dtype fp32,bf16 --out "$OUT/step.md" "${STEP_ARGS[@]}"

# -- 3: the quickstart on one GPU ---------------------------------------------------------------
# DolphinFlow on CUDA compiles its element-wise passes by default (compiled=None): the first
# steps include that compilation.
part quickstart 120 40 train_fig -- "$PY" launch/train.py configs/quickstart.toml \
    --run.nproc 1 --placement.kind none --run.device "$DEV" --run.out_dir "$SCRATCH/quickstart" \
    --log.progress false "${QUICK_ARGS[@]}"

# -- 4: placement offload -----------------------------------------------------------------------
if ls models/SmolLM2-135M/*.safetensors >/dev/null 2>&1 && have transformers; then
    part offload 70 0 train_fig -- "$PY" launch/train.py configs/smollm2-135m-offload.toml \
        --run.out_dir "$SCRATCH/offload" --train.steps 20 --train.eval_every 10 \
        --data.max_bytes 2000000 --checkpoint.every 10 --log.progress false
else
    part offload 70 0 train_fig -- "$PY" launch/train.py configs/quickstart.toml \
        --run.nproc 1 --placement.kind offload --run.device "$DEV" --run.out_dir "$SCRATCH/offload" \
        --log.progress false "${OFFLOAD_ARGS[@]}"
fi

# -- 5: the compiled paths, with the time left --------------------------------------------------
if [ "$DEV" = cpu ]; then
    skip_row smoke-compiled "test mode (torch.compile on a CPU takes minutes)"
    skip_row step-compiled "test mode"
else
    part smoke-compiled 150 40 smoke_fig -- "$PY" -m bench.gpu_smoke --device cuda \
        --compiled default --dtypes fp32,bf16 --json "$OUT/smoke-compiled.json"
    part step-compiled 150 0 step_fig -- "$PY" -m bench.gpu_step --device cuda --compiled default \
        --dtype fp32 --only adamw-fused,muon,df-vector,df-matrix,df8-vector,whiteflow,factored-adam \
        --steps 10 --warmup 2 --out "$OUT/step-compiled.md"
fi

{
    echo
    echo "Total: $(($(date +%s) - START)) s. Logs: <part>.log beside this file."
    cat "$DETAILS"
} >>"$SUMMARY"
rm -rf "$SCRATCH"
echo "gpu_check: done in $(($(date +%s) - START)) s; summary: $SUMMARY"
# exit non-zero when any part did
! grep -qE '^\| [a-z-]+ \| [1-9][0-9]* \|' "$SUMMARY"
