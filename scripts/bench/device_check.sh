#!/usr/bin/env bash
# The GPU measurement, from the repository alone: ours and timm 1.0.31 side by side in one run, on one H100/H200.
#
# On the GPU machine (torch >= 2.10 with CUDA and timm 1.0.31 installed, as pip installs them; no network, no
# install, nothing prepared), from the repository root:
#     timeout 430 bash scripts/bench/device_check.sh            # the key numbers, <= 420 s
#     timeout 430 bash scripts/bench/device_check.sh --more     # the rest, <= 420 s (same machine or another)
#     timeout 430 bash scripts/bench/device_check.sh --devaug   # training with and without --device-aug, <= 420 s
# then read $OUT/summary.md (default bench/device_out/; one screen). A step that failed can be rerun alone:
#     ONLY="compiled_ours" BUDGET_S=150 bash scripts/bench/device_check.sh
# CPU dry run of the same steps from a clean clone (creates .venv as scripts/test.sh does; tiny model, 2 workers;
# ~6-10 min on 2 shared cores, mostly CPU compiles; a check of the script, not a measurement):
#     bash scripts/bench/device_check.sh --cpu-smoke
#
# Data: scripts/bench/make_bench_data.py writes 2,048 JPEGs with ImageNet's size and aspect-ratio distribution and
# photo-like content (see its docstring) in a few seconds; train/ lists each REPEAT times (symlinks) so that an
# epoch is long enough for 16 workers to reach steady state. timm's side runs from its pip package: bench_model.py
# builds timm's NaFlexVit and NAdamW, bench_loader.py timm's create_naflex_loader, and bench_e2e.sh runs
# scripts/bench/timm_train.py (timm's train.py loop assembled from the package; train.py itself is not in it).
#
# Steps, each under its own `timeout` (clamped to what is left of BUDGET_S; one that would get less than its
# minimum is reported "not run"), so that one slow step cannot lose the others:
#   key numbers (default): data; cuda_tests (pytest -m cuda); eager (bench_model.py: ours packed with varlen vs
#     timm padded, NaFlexViT-B/16, bf16, NAdamW, drop-path 0.2, L in 128..1024, 64 x 1024 tokens per step); compiled
#     (ours packed, torch.compile dynamic=True); loader (bench_loader.py -j 16, the card's augmentations, ours vs
#     timm); e2e (bench_e2e.sh: our train.py vs timm_train.py with the card's flags, -j 16)
#   --more: compiled_timm (timm padded compiled as timm's train.py compiles); eager_more (ours padded and a plain
#     timm ViT without masks, the upper bound); profile (torch.profiler table of ours, eager); loader_profile
#     (profile_loader.py: CPU ms per stage, ours vs timm); e2e_compiled (both with --torchcompile); compiled_flex
#     (only with time left)
#   --devaug: devaug_tests (pytest -m cuda on the device path's tests: the device step on CUDA against the CPU);
#     e2e_cpuaug and e2e_devaug (bench_e2e.sh, ours only, the card's flags without and with --device-aug)
# Environment: OUT (results; default bench/device_out), BUDGET_S (seconds for the steps; default 385 on GPU, 1200
# on CPU), ONLY="eager loader" (these steps only), SKIP="e2e", REPEAT (default 3 on GPU, 1 on CPU), IMAGES (bench
# data train images; default 2048 on GPU, 192 on CPU), PYTHON (default python3 on GPU, .venv's on CPU).
# Results in $OUT, eight files or fewer: summary.md, device_check.log (everything printed), results.tar.gz (every
# log and JSON), bench_model_*.json.
set -uo pipefail
cd "$(dirname "$0")/../.."

MODE=gpu
SET=key
for a in "$@"; do
    case "$a" in
        --cpu-smoke) MODE=cpu ;;
        --more) SET=more ;;
        --devaug) SET=devaug ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$MODE" = cpu ] && [ -z "${PYTHON:-}" ]; then
    source scripts/venv.sh
    naflex_venv dev > /tmp/naflex_venv_install.log 2>&1 \
        || { echo "error: could not install the project into .venv (see /tmp/naflex_venv_install.log)" >&2; exit 2; }
    PYTHON="$PY"
fi
PY="${PYTHON:-python3}"
export PYTHON="$PY"
OUT="${OUT:-bench/device_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
STAMP="$(date +%Y%m%d-%H%M%S)"
RUN="${RUN_ROOT:-$PWD/bench/device_run}/$STAMP"
mkdir -p "$RUN"
if [ "$MODE" = gpu ]; then
    BUDGET_S="${BUDGET_S:-385}"; REPEAT="${REPEAT:-3}"; IMAGES="${IMAGES:-2048}"; NPROC="$(nproc)"
else
    BUDGET_S="${BUDGET_S:-1200}"; REPEAT="${REPEAT:-1}"; IMAGES="${IMAGES:-192}"; NPROC=2
fi
export PYTHONUNBUFFERED=1
# One inductor cache per machine: a rerun after a compile that ran out of time starts from what it compiled (the
# summary says whether the cache was cold).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/naflex_inductor}"
CACHE_STATE=cold
[ -d "$TORCHINDUCTOR_CACHE_DIR" ] && CACHE_STATE=warm
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
ROWS=()
DATA="$RUN/data"  # made by the data step

# run_step NAME LIMIT_S MIN_S 'shell command'
run_step() {
    local name=$1 limit=$2 min=$3 cmd=$4
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    if [[ " ${SKIP:-} " == *" $name "* ]]; then ROWS+=("| $name | skipped (SKIP) | |"); return 0; fi
    local left=$(( BUDGET_S - ($(date +%s) - T0) ))
    if [ "$left" -lt "$min" ]; then
        echo "== $name: not run, ${left}s of BUDGET_S left (needs >= ${min}s)"
        ROWS+=("| $name | not run: ${left}s left (< ${min}s) | |")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "== $name  (limit ${limit}s, t=$(( $(date +%s) - T0 ))s)  $cmd"
    local t rc status dt
    t=$(date +%s)
    timeout -k 5 "$limit" bash -c "$cmd" > "$RUN/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t ))
    status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"
    elif [ $rc -ne 0 ]; then status="FAILED rc=$rc"; fi
    ROWS+=("| $name | $status | ${dt}s |")
    grep -v "\[__recompiles\]" "$RUN/$name.log" | tail -n "${TAIL:-12}"  # the full log is in results.tar.gz
    echo "-- $name: $status in ${dt}s"
}

env_info() {
    echo "== device_check.sh $MODE ($SET)  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  budget ${BUDGET_S}s  run dir $RUN  OUT $OUT"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>&1 \
            | sed 's/^/gpu: /'
    fi
    echo "cpus $(nproc), mem $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}'), inductor cache $CACHE_STATE"
    (git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -5) | sed 's/^/git: /'
    (cd /tmp && timeout 60 "$PY" - "$MODE" <<'EOF'
import sys, platform
import torch, torchvision, PIL, timm
import naflex, loaders, augment, train, validate  # the project imports from PYTHONPATH
print(f"python {platform.python_version()}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"timm {timm.__version__}  Pillow {PIL.__version__}")
if timm.__version__ != "1.0.31":
    print(f"WARNING: timm {timm.__version__} installed; the reference is timm 1.0.31")
from torch.nn.attention import varlen  # noqa: F401  (varlen_attn needs torch >= 2.10)
if sys.argv[1] == "gpu":
    import time
    d = torch.device("cuda")
    p = torch.cuda.get_device_properties(d)
    print(f"cuda {torch.version.cuda}  cudnn {torch.backends.cudnn.version()}  {p.name}  {p.multi_processor_count} SMs  "
          f"{p.total_memory / 2**30:.0f} GiB  sm{p.major}{p.minor}")
    a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s (mean of 10)")
EOF
    ) || echo "WARNING: environment check failed (see above)"
}

summarize() {
    {
        echo "# device_check.sh $MODE, $SET, $(date -u '+%Y-%m-%d %H:%M UTC'): $(( $(date +%s) - T0 ))s of ${BUDGET_S}s"
        "$PY" - "$RUN" <<'EOF'
import json, re, sys
from pathlib import Path
run = Path(sys.argv[1])
env = (run / "env.log").read_text() if (run / "env.log").exists() else ""
for ln in env.splitlines():
    if ln.startswith(("gpu: ", "python ", "cuda ", "bf16 matmul", "cpus ", "WARNING")):
        print(f"    {ln}")
data = run / "data.log"
if data.exists():
    for ln in data.read_text().splitlines()[-3:]:
        print(f"    data: {ln.strip()}")
EOF
        echo
        echo "| step | status | time |"
        echo "|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        "$PY" - "$RUN" <<'EOF'
import json, re, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = {}
for name in ("eager", "compiled", "compiled_timm", "eager_more", "compiled_flex"):
    p = run / f"bench_model_{name}.json"
    if p.exists():
        tag = "compiled" if name.startswith("compiled") else "eager"
        tag += " flex" if name == "compiled_flex" else ""
        for r in json.loads(p.read_text())["results"]:
            rows[(r["variant"], tag)] = r
if rows:
    print("\n| train step | img/s | valid tok/s | TFLOP/s | MFU | peak GiB | first calls s | compile s | recompiles "
          "| timed compiles |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (v, tag), r in rows.items():
        cs = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        print(f"| {v} {tag} | {r['images_per_s']:.0f} | {r['valid_tokens_per_s'] / 1e3:.0f}k | {r.get('tflops', 0):.0f} | "
              f"{100 * r.get('mfu', 0):.1f}% | {r.get('peak_mem_gib', float('nan')):.1f} | "
              f"{r.get('first_calls_total_s', float('nan')):.1f} | {cs} | {r.get('recompiles', '')} | "
              f"{r.get('timed_compiles', '')} |")
    ref = rows.get(("timm_padded", "eager"))
    if ref:
        for (v, tag), r in rows.items():
            if (v, tag) != ("timm_padded", "eager"):
                print(f"ratio {v} {tag} / timm_padded eager: {r['valid_tokens_per_s'] / ref['valid_tokens_per_s']:.2f}x")
    a, b = rows.get(("ours_packed", "compiled")), rows.get(("timm_padded", "compiled"))
    if a and b:
        print(f"ratio ours_packed compiled / timm_padded compiled: "
              f"{a['valid_tokens_per_s'] / b['valid_tokens_per_s']:.2f}x")
for name, pat in (("loader", r"^\|"), ("loader_profile", r"^(# |(ours|timm): \d+ images|ours/timm|timm dropped)"),
                  ("e2e", r"^(\s+steps|last epoch|ours |timm |ratio|validation)"),
                  ("e2e_compiled", r"^(\s+steps|last epoch|ours |timm |ratio)"),
                  ("e2e_cpuaug", r"^(\s+steps|last epoch|ours )"), ("e2e_devaug", r"^(\s+steps|last epoch|ours )")):
    p = run / f"{name}.log"
    if p.exists():
        lines = [ln for ln in p.read_text().splitlines() if re.match(pat, ln)]
        if lines:
            print(f"\n{name}:\n" + "\n".join(lines))
EOF
    } > "$RUN/summary.md"
}

main() {
    env_info 2>&1 | tee "$RUN/env.log"
    local AUG="--aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --reprob 0 --mixup 0.8 --cutmix 1.0"
    local BM="$PY scripts/bench/bench_model.py" D="$DATA" J=$NPROC
    local LD="$PY scripts/bench/bench_loader.py --data-dir $D $AUG"
    if [ "$MODE" = gpu ]; then
        J=16
        BM="$BM --device cuda --model naflexvit_base_patch16_gap -b 64 --seq-lens 128 256 576 784 1024 --drop-path 0.2 --amp-dtype bfloat16"
        LD="$LD -j $J -b 64 --naflex-train-seq-lens 128 256 576 784 1024 --steps 40"
        local STEPS="--steps 20 --warmup 5" CSTEPS="--steps 15 --warmup 5" E2E="IMAGES=0"
        # limits: data 20 + cuda_tests 40 + eager 55 + compiled 120 + loader 40 + e2e 110 = 385 s, the whole budget
        local L=(20 40 55 120 40 110)
    else
        BM="$BM --device cpu --model naflexvit_tiny_test -b 8 --seq-lens 32 64"  # >= 8 images: no size-1 recompile
        LD="$LD -j $J -b 8 --naflex-train-seq-lens 64 128 --steps 3"
        local STEPS="--steps 3 --warmup 2" CSTEPS="--steps 3 --warmup 2" E2E="IMAGES=96 OURS_LOG_INTERVAL=2"
        local L=(60 180 120 400 120 300)
    fi
    # every run makes its data (seconds), whatever ONLY says: the loader and e2e steps read it
    ONLY="${ONLY:+$ONLY data}" run_step data "${L[0]}" 5 \
        "$PY scripts/bench/make_bench_data.py $DATA --train $IMAGES --val 0 -j $NPROC --repeat $REPEAT"
    if [ "$SET" = devaug ]; then
        # limits on the GPU: data 20 + 40 + 2 x 160 = 380 s; both runs train the same images for one epoch (on the
        # CPU the device side is ~5x slower than the workers' path: a check of the plumbing, not a measurement)
        local DA="ONLY=ours OUT=$RUN/e2e $E2E SKIP_VALIDATE=1"
        local DL=(40 160 160)
        if [ "$MODE" = gpu ]; then DA="$DA IMAGES=4096"; else DL=(60 120 400); fi
        local DT="tests/test_device_aug.py tests/test_device_ops.py tests/test_device_resize.py"
        DT="$DT tests/test_device_geometry.py tests/test_device_mix.py"
        run_step devaug_tests "${DL[0]}" 20 "$PY -m pytest -q -rs -p no:cacheprovider -m cuda $DT"
        run_step e2e_cpuaug "${DL[1]}" 60 "$DA bash scripts/bench/bench_e2e.sh $D $J"
        run_step e2e_devaug "${DL[2]}" 60 "$DA EXTRA_TRAIN_ARGS=--device-aug bash scripts/bench/bench_e2e.sh $D $J"
    elif [ "$SET" = key ]; then
        run_step cuda_tests "${L[1]}" 20 "$PY -m pytest -q -rs -p no:cacheprovider -m cuda tests"
        run_step eager "${L[2]}" 30 "$BM --variants ours_packed timm_padded $STEPS --json $RUN/bench_model_eager.json"
        run_step compiled "${L[3]}" 50 "TORCH_LOGS=recompiles $BM --compile --variants ours_packed $CSTEPS --json $RUN/bench_model_compiled.json"
        run_step loader "${L[4]}" 20 "$LD"
        run_step e2e "${L[5]}" 40 "OUT=$RUN/e2e $E2E SKIP_VALIDATE=1 bash scripts/bench/bench_e2e.sh $D $J"
    else
        # limits: data + 130 + 45 + 30 + 30 + 130 = 385 s; compiled_flex only with time left over
        run_step compiled_timm 130 60 "TORCH_LOGS=recompiles $BM --compile --variants timm_padded $CSTEPS --json $RUN/bench_model_compiled_timm.json"
        run_step eager_more 45 25 "$BM --variants ours_padded vit_plain $STEPS --json $RUN/bench_model_eager_more.json"
        run_step profile 30 20 "$BM --variants ours_packed --steps 5 --warmup 5 --profile --json $RUN/bench_model_profile.json"
        run_step loader_profile 30 15 "$PY scripts/bench/profile_loader.py --data-dir $DATA --cycles 1 --fraction 0.25"
        run_step e2e_compiled 130 60 "OUT=$RUN/e2e_compiled $E2E SKIP_VALIDATE=1 EXTRA_TRAIN_ARGS=--torchcompile TIMM_TRAIN_ARGS=--torchcompile bash scripts/bench/bench_e2e.sh $D $J"
        if [ "$MODE" = gpu ]; then  # FlexAttention has no backward pass on the CPU
            run_step compiled_flex 100 60 "TORCH_LOGS=recompiles $BM --compile --variants ours_packed --attn-backend flex $CSTEPS --json $RUN/bench_model_compiled_flex.json"
        else
            ROWS+=("| compiled_flex | GPU only | |")
        fi
    fi
    summarize
    cp "$RUN/summary.md" "$OUT/summary.md"
    for j in "$RUN"/bench_model_*.json; do [ -f "$j" ] && cp "$j" "$OUT/"; done
    tar czf "$OUT/results.tar.gz" -C "$(dirname "$RUN")" --exclude='*.pth' --exclude='*.pth.tar' \
        --exclude='data' --exclude='data-*' --exclude='tensorboard' "$STAMP" 2>/dev/null \
        || echo "WARNING: could not write results.tar.gz"
    echo
    echo "================ summary ($RUN/summary.md; files in $OUT) ================"
    cat "$RUN/summary.md"
    grep -q "FAILED\|TIMEOUT" "$RUN/summary.md" && return 1
    return 0
}

main 2>&1 | tee -a "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
