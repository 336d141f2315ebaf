#!/usr/bin/env bash
# The GPU measurement in one run: the CUDA tests, then the train-step benchmark (ours packed vs timm padded vs a
# plain ViT, eager and compiled) and the end-to-end benchmarks, timm 1.0.31 measured in the same run.
#
# 1. Prepare, on a machine with ../shared/data and a timm checkout (~5 s; writes the git-ignored bench/caltech_subset,
#    bench/timm_scripts and bench/wheels, ~56 MiB with the tracked files):
#        python scripts/bench/make_bench_subset.py ../pytorch-image-models
# 2. Copy the repository's tracked files and those three bench/ folders to the GPU machine (one H100/H200; torch
#    >= 2.10 with CUDA; no network needed: the timm wheel is installed from bench/wheels when its timm differs).
# 3. There, from the repository root (~8-9 min: the steps stop at BUDGET_S=480 s in all, + <= 20 s to end a step
#    at its limit and pack the results, so the whole run ends within 540 s):
#        timeout 540 bash scripts/bench/device_check.sh
# 4. Read $OUT/summary.md (default bench/device_out/): status per step, the train-step table, same-run ratios,
#    e2e / loader lines. Rerun a part that failed or was not run, e.g. ONLY="compiled_timm" BUDGET_S=200.
# CPU dry run here (tiny model, few steps, <= 2 workers; 5-15 min on 2 shared cores, mostly CPU compiles):
#     bash scripts/bench/device_check.sh --cpu-smoke
#
# Environment: E2E_TRAIN_ARGS / E2E_TIMM_ARGS (extra flags for our / timm's train.py in e2e, e.g. --torchcompile),
# OUT (results folder; default bench/device_out), BUDGET_S (seconds for all steps; default 480 GPU, 900 CPU),
# ONLY="eager compiled_ours" (run only these steps), SKIP="cpu_tests ...", DATA (subset, default
# bench/caltech_subset), TIMM_SCRIPTS (default bench/timm_scripts), REPEAT (each train image listed REPEAT times,
# as symlinks made on the machine, so 16 workers reach steady state: default 3 on GPU), PYTHON (default python3).
# Steps, in priority order (the four key numbers first), each under its own `timeout` clamped to what is left of
# BUDGET_S (a step that would get less than its minimum is reported "not run"):
#   env          nvidia-smi, versions, bf16 matmul TFLOP/s; installs bench/wheels' timm 1.0.31 into
#                /tmp/naflex_site when the machine's timm differs; the project runs from PYTHONPATH=repo
#                (no install needed; INSTALL=1 also runs `pip install --no-deps --no-build-isolation -e .`)
#   cuda_tests   pytest -m cuda tests (varlen/flex/dense backends agree on CUDA, qk_norm under autocast, no host
#                sync, prefetcher hand-over)
#   eager        scripts/bench/bench_model.py: ours packed (varlen) / ours padded / timm padded / vit_plain (timm
#                VisionTransformer, same size, no masks: the upper bound), NaFlexViT-B/16, bf16, NAdamW (ours:
#                naflex.train.optim as train.py; timm: timm's), drop-path 0.2, L in 128..1024, 64x1024 tokens/step,
#                the library's Trainer step on the loader's batches; peak memory per variant
#   compiled_ours  same with --compile (dynamic=True for ours), ours packed, + --profile (torch.profiler top-15
#                table); compile time, frames compiled, recompiles and graphs come from bench_model's JSON
#                (torch._dynamo compile callbacks/counters; TORCH_LOGS=recompiles only adds the reasons to the log)
#   compiled_timm  timm padded compiled as timm's train.py does (automatic dynamic); a separate step, so a slow
#                compile of one cannot lose the other's result
#   e2e          scripts/bench/bench_e2e.sh: our train.py vs timm's train.py (card flags, -j 16; whole epoch and steady
#                state from update 10), then our validate.py vs timm's validate.py --naflex-loader at 576 on the
#                same images. E2E_TRAIN_ARGS / E2E_TIMM_ARGS (e.g. "--torchcompile") go to our / timm's train.py
#   loader       scripts/bench/bench_loader.py -j 16, documented augmentations, ours vs timm
#   profile      scripts/bench/profile_loader.py: per-stage CPU ms/image on this machine's CPU, ours vs timm
#   compiled_flex  ours packed compiled with --attn-backend flex (only if time is left)
#   compiled_plain vit_plain compiled (the compiled no-mask upper bound; only if time is left)
#   cpu_tests    tests/test_attention.py tests/test_model.py on the machine (only if time is left)
# Results in $OUT, eight files or fewer so they are quick to copy back: device_check.log (everything printed),
# summary.md (status per step + headline figures), results.tar.gz (every log/JSON/CSV, no checkpoints),
# bench_model_eager.json, bench_model_compiled_ours.json, bench_model_compiled_timm.json, profile_loader.json.
# summary.md's train-step table: first calls s = the first step of each L (synced; compile included), compile s
# = time in torch.compile's compile events, recompiles / graphs / timed compiles (must be 0) from the JSON.
set -uo pipefail
cd "$(dirname "$0")/../.."

MODE=gpu
for a in "$@"; do
    case "$a" in
        --cpu-smoke) MODE=cpu ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
export PYTHON="$PY"
OUT="${OUT:-bench/device_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
STAMP="$(date +%Y%m%d-%H%M%S)"
RUN="$PWD/bench/device_run/$STAMP"
mkdir -p "$RUN"
DATA="${DATA:-bench/caltech_subset}"
TIMM_SCRIPTS="${TIMM_SCRIPTS:-bench/timm_scripts}"
TIMM_WANT="1.0.31"
if [ "$MODE" = gpu ]; then BUDGET_S="${BUDGET_S:-480}"; REPEAT="${REPEAT:-3}"; else BUDGET_S="${BUDGET_S:-900}"; REPEAT="${REPEAT:-1}"; fi
export PYTHONUNBUFFERED=1
# A cache of this run's own: compile figures are cold compiles, and a step ended mid-compile cannot leave a
# half-written kernel library for a later run to load.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/naflex_inductor/$STAMP}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
ROWS=()

# run_step NAME LIMIT_S MIN_S 'shell command'
run_step() {
    local name=$1 limit=$2 min=$3 cmd=$4
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    if [[ " ${SKIP:-} " == *" $name "* ]]; then ROWS+=("| $name | skipped (SKIP) | | |"); return 0; fi
    local left=$(( BUDGET_S - ($(date +%s) - T0) ))
    if [ "$left" -lt "$min" ]; then
        echo "== $name: not run, ${left}s of BUDGET_S left (needs >= ${min}s)"
        ROWS+=("| $name | not run: ${left}s left of BUDGET_S (< ${min}s) | | |")
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "== $name  (timeout ${limit}s, t=$(( $(date +%s) - T0 ))s)  $cmd"
    local t rc status dt
    t=$(date +%s)
    timeout -k 15 "$limit" bash -c "$cmd" > "$RUN/$name.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t ))
    status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"
    elif [ $rc -ne 0 ]; then status="FAILED rc=$rc"; fi
    ROWS+=("| $name | $status | ${dt}s | $name.log |")
    grep -v "\[__recompiles\]" "$RUN/$name.log" | tail -n "${TAIL:-30}"  # full log (recompile reasons) kept
    echo "-- $name: $status in ${dt}s"
}

env_step() {
    echo "== env  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  mode=$MODE  budget=${BUDGET_S}s  run dir $RUN"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
            --format=csv 2>&1
    fi
    echo "cpus $(nproc), mem $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}')"
    (git rev-parse --short HEAD 2>/dev/null && git status --short 2>/dev/null | head -20) | sed 's/^/git: /'
    local have
    have=$("$PY" -c 'import timm; print(timm.__version__)' 2>/dev/null || echo none)
    if [ "$have" != "$TIMM_WANT" ]; then
        local whl
        whl=$(ls bench/wheels/timm-"$TIMM_WANT"-*.whl 2>/dev/null | head -1)
        if [ -n "$whl" ]; then
            echo "timm $have here; installing $whl into /tmp/naflex_site"
            timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/naflex_site "$whl" && export PYTHONPATH="$PYTHONPATH:/tmp/naflex_site"
        else
            echo "WARNING: timm $have here and no bench/wheels/timm-$TIMM_WANT-*.whl: the reference is not $TIMM_WANT"
        fi
    fi
    if [ "${INSTALL:-0}" = 1 ]; then
        timeout 180 "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
            || echo "pip install -e . failed; the project runs from PYTHONPATH=$PWD"
    fi
    (cd /tmp && "$PY" - "$MODE" <<'EOF'
import sys, platform
import torch, torchvision, PIL, timm
import naflex, loaders, augment, train, validate  # the project imports from PYTHONPATH
print(f"python {platform.python_version()}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"timm {timm.__version__} ({timm.__file__})  Pillow {PIL.__version__}")
from torch.nn.attention import varlen  # noqa: F401  (varlen_attn needs torch >= 2.10)
if sys.argv[1] == "gpu":
    import time
    d = torch.device("cuda")
    p = torch.cuda.get_device_properties(d)
    print(f"cuda {torch.version.cuda}  {p.name}  {p.multi_processor_count} SMs  {p.total_memory / 2**30:.0f} GiB")
    a = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=d, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    print(f"bf16 matmul 8192^3: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s (mean of 10)")
EOF
    ) || echo "WARNING: environment check failed (see above)"
}

make_repeat_data() {  # train/<class>/r<k>_<file> symlinks to the subset (k < REPEAT); val/ -> the subset's val/
    "$PY" - "$DATA" "$RUN/data_x$REPEAT" "$REPEAT" <<'EOF'
import os, sys
from pathlib import Path
src, dst, k = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
n = 0
for c in sorted(os.listdir(src / "train")):
    (dst / "train" / c).mkdir(parents=True, exist_ok=True)
    for f in sorted(os.listdir(src / "train" / c)):
        for r in range(k):
            os.symlink(src / "train" / c / f, dst / "train" / c / f"r{r}_{f}")
            n += 1
if (src / "val").is_dir():
    os.symlink(src / "val", dst / "val")
print(f"{dst}: {n} train entries ({k} x the subset)")
EOF
}

summarize() {
    {
        echo "# device_check.sh ($MODE) $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - T0 ))s of ${BUDGET_S}s"
        echo
        echo "| step | status | time | log |"
        echo "|---|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        echo
        "$PY" - "$RUN" <<'EOF'
import json, re, sys
from pathlib import Path
run = Path(sys.argv[1])
env = (run / "env.log").read_text() if (run / "env.log").exists() else ""
for ln in env.splitlines():
    if ln.startswith(("python ", "cuda ", "bf16 matmul", "name,", "NVIDIA", "cpus ")) or "NVIDIA" in ln:
        print(f"    {ln}")
def load(name):
    p = run / f"bench_model_{name}.json"
    return {r["variant"]: r for r in json.loads(p.read_text())["results"]} if p.exists() else {}
eager, comp = load("eager"), {**load("compiled_ours"), **load("compiled_timm")}
flex, plain = load("compiled_flex"), load("compiled_plain")
if eager or comp:
    print("\n| train step | img/s | valid tok/s | TFLOP/s | MFU | peak mem GiB | warmup s | first calls s | compile s "
          "| frames | recompiles | graphs | timed compiles |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tag, res in (("eager", eager), ("compiled", comp), ("compiled flex", flex), ("compiled", plain)):
        for v, r in res.items():
            cells = [r.get(k, "") for k in ("dynamo_compiles", "recompiles", "graphs", "timed_compiles")]
            cs = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
            print(f"| {v} {tag} | {r['images_per_s']:.0f} | {r['valid_tokens_per_s'] / 1e3:.0f}k | "
                  f"{r.get('tflops', 0):.0f} | {100 * r.get('mfu', 0):.1f}% | {r.get('peak_mem_gib', float('nan')):.1f} | "
                  f"{r['warmup_s']:.1f} | {r.get('first_calls_total_s', float('nan')):.1f} | {cs} | "
                  + " | ".join(str(c) for c in cells) + " |")
    ref = eager.get("timm_padded")
    if ref:
        for tag, res in (("eager", eager), ("compiled", comp), ("compiled flex", flex), ("compiled", plain)):
            for v, r in res.items():
                if (v, tag) != ("timm_padded", "eager"):
                    print(f"ratio {v} {tag} / timm_padded eager: {r['valid_tokens_per_s'] / ref['valid_tokens_per_s']:.2f}x")
    if "ours_packed" in comp and "timm_padded" in comp:
        print(f"ratio ours_packed compiled / timm_padded compiled: "
              f"{comp['ours_packed']['valid_tokens_per_s'] / comp['timm_padded']['valid_tokens_per_s']:.2f}x")
    for name, res in (("compiled_ours", comp), ("eager", eager)):
        if res.get("ours_packed", {}).get("profile"):
            print(f"\ntorch.profiler, ours_packed ({name}), top 15:\n```\n{res['ours_packed']['profile']}```")
            break
for name, pat in (("e2e", r"^(\s+steps|last epoch|ours |timm |ratio|validation)"), ("loader", r"^\|"),
                  ("profile", r"^(# |(ours|timm): \d+ images|ours/timm|timm dropped)")):
    p = run / f"{name}.log"
    if p.exists():
        lines = [ln for ln in p.read_text().splitlines() if re.match(pat, ln)]
        if lines:
            print(f"\n{name}:\n" + "\n".join(lines))
EOF
    } > "$RUN/summary.md"
}

main() {
    echo "== device_check.sh $MODE  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  OUT=$OUT"
    if [ ! -d "$DATA/train" ]; then
        echo "error: $DATA/train not found; prepare it: python scripts/bench/make_bench_subset.py TIMM_CHECKOUT" >&2
        return 2
    fi
    [ -f "$TIMM_SCRIPTS/train.py" ] || echo "WARNING: $TIMM_SCRIPTS/train.py missing: e2e will fail (make_bench_subset.py TIMM_CHECKOUT)"
    env_step 2>&1 | tee "$RUN/env.log"
    # the timm wheel's PYTHONPATH entry must reach the steps: env_step ran in a pipeline (subshell)
    if [ -d /tmp/naflex_site/timm ]; then export PYTHONPATH="$PYTHONPATH:/tmp/naflex_site"; fi
    make_repeat_data
    local D="$RUN/data_x$REPEAT"
    local AUG="--aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --reprob 0 --mixup 0.8 --cutmix 1.0"
    local BM="$PY scripts/bench/bench_model.py"
    local E2E_ENV
    E2E_ENV="EXTRA_TRAIN_ARGS=$(printf %q "${E2E_TRAIN_ARGS:-}") TIMM_TRAIN_ARGS=$(printf %q "${E2E_TIMM_ARGS:-}")"
    if [ "$MODE" = gpu ]; then
        BM="$BM --device cuda --model naflexvit_base_patch16_gap -b 64 --seq-lens 128 256 576 784 1024 --drop-path 0.2 --amp-dtype bfloat16"
        # Limits: env (~30 s) + cuda_tests + eager + compiled_ours at their limits (+ 15 s to end one) still leave
        # compiled_timm its minimum of the 480 s: the four key numbers come first.
        run_step cuda_tests 90 30 "$PY -m pytest -q -rs -p no:cacheprovider -m cuda tests"
        run_step eager 90 60 "$BM --variants ours_packed ours_padded timm_padded vit_plain --steps 20 --warmup 5 --json $RUN/bench_model_eager.json"
        run_step compiled_ours 150 90 "TORCH_LOGS=recompiles $BM --compile --variants ours_packed --steps 15 --warmup 5 --profile --json $RUN/bench_model_compiled_ours.json"
        run_step compiled_timm 170 90 "TORCH_LOGS=recompiles $BM --compile --variants timm_padded --steps 15 --warmup 5 --json $RUN/bench_model_compiled_timm.json"
        run_step e2e 240 90 "OUT=$RUN/e2e IMAGES=0 $E2E_ENV bash scripts/bench/bench_e2e.sh $TIMM_SCRIPTS $D 16"
        run_step loader 120 40 "$PY scripts/bench/bench_loader.py --data-dir $D -j 16 $AUG -b 64 --naflex-train-seq-lens 128 256 576 784 1024"
        run_step profile 60 20 "$PY scripts/bench/profile_loader.py --data-dir $DATA --cycles 2 --json $RUN/profile_loader.json"
        run_step compiled_flex 150 90 "TORCH_LOGS=recompiles $BM --compile --variants ours_packed --attn-backend flex --steps 10 --warmup 5 --json $RUN/bench_model_compiled_flex.json"
        run_step compiled_plain 150 90 "$BM --compile --variants vit_plain --steps 10 --warmup 5 --json $RUN/bench_model_compiled_plain.json"
        local XD=""
        "$PY" -c "import xdist" 2>/dev/null && XD="-n 8"
        run_step cpu_tests 120 60 "$PY -m pytest -q -rs -p no:cacheprovider $XD tests/test_attention.py tests/test_model.py"
    else
        BM="$BM --device cpu --model naflexvit_tiny_test -b 8 --seq-lens 32 64"  # >= 8 images: no size-1 recompile
        run_step cuda_tests 120 30 "$PY -m pytest -q -rs -p no:cacheprovider -m cuda tests"
        run_step eager 90 20 "$BM --variants ours_packed ours_padded timm_padded vit_plain --steps 3 --warmup 2 --json $RUN/bench_model_eager.json"
        run_step compiled_ours 300 60 "TORCH_LOGS=recompiles $BM --compile --variants ours_packed --steps 3 --warmup 2 --profile --json $RUN/bench_model_compiled_ours.json"
        run_step compiled_timm 300 60 "TORCH_LOGS=recompiles $BM --compile --variants timm_padded --steps 3 --warmup 2 --json $RUN/bench_model_compiled_timm.json"
        run_step e2e 200 60 "OUT=$RUN/e2e IMAGES=101 OURS_LOG_INTERVAL=2 $E2E_ENV bash scripts/bench/bench_e2e.sh $TIMM_SCRIPTS $D 2"
        run_step loader 90 20 "$PY scripts/bench/bench_loader.py --data-dir $D -j 2 $AUG -b 8 --naflex-train-seq-lens 64 128 --steps 3"
        run_step profile 60 15 "$PY scripts/bench/profile_loader.py --data-dir $DATA --cycles 1 --fraction 0.05 --json $RUN/profile_loader.json"
        ROWS+=("| compiled_flex | GPU only | | |" "| compiled_plain | GPU only | | |"
               "| cpu_tests | not in the smoke run (CI runs them) | | |")
    fi
    summarize
    # Eight files or fewer in $OUT: the log (tee), the summary, the JSONs, one archive of the rest.
    cp "$RUN/summary.md" "$OUT/summary.md"
    for j in bench_model_eager bench_model_compiled_ours bench_model_compiled_timm profile_loader; do
        [ -f "$RUN/$j.json" ] && cp "$RUN/$j.json" "$OUT/$j.json"
    done
    tar czf "$OUT/results.tar.gz" -C "$(dirname "$RUN")" --exclude='*.pth' --exclude='*.pth.tar' \
        --exclude='data_x*' --exclude='data-*' --exclude='__pycache__' "$STAMP" 2>/dev/null \
        || echo "WARNING: could not write results.tar.gz"
    echo
    echo "================ summary ($RUN/summary.md; files in $OUT) ================"
    cat "$RUN/summary.md"
    grep -q "FAILED\|TIMEOUT" "$RUN/summary.md" && return 1
    return 0
}

main 2>&1 | tee -a "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
