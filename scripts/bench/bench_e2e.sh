#!/usr/bin/env bash
# End-to-end training throughput: our train.py vs timm 1.0.31's training loop, the model card's flags, same images.
#
#   bash scripts/bench/bench_e2e.sh DATA_DIR [WORKERS]
#     DATA_DIR   ImageNet-layout folder with train/<class>/*.jpg (scripts/bench/make_bench_data.py makes one)
#     WORKERS    loader workers per run (default 16 on GPU, 2 on CPU)
#   timm's side is scripts/bench/timm_train.py (timm's train.py loop built from timm's pip package: its NaFlex
#   loader, model, optimizer, scheduler and step). TIMM_CHECKOUT=/path/to/pytorch-image-models runs that clone's
#   train.py against the installed timm instead, and adds validate.py vs timm's validate.py on our last.pth.
#   Environment: IMAGES (train images used, a per-class subset; default 4096, 0 = all), DEVICE (cuda if present),
#   MODEL (default naflexvit_base_patch16_gap on cuda, naflexvit_tiny_test on cpu), BATCH (-b, default 64 on
#   cuda, 8 on cpu), SEQ_LENS (default "128 256 576 784 1024" on cuda, "64 128" on cpu), OUT (bench/e2e),
#   PYTHON (default python, else python3), EPOCHS (epochs per run, default 1; the table reports the last one),
#   EXTRA_TRAIN_ARGS (appended to our train.py's flags, e.g. "--torchcompile"), TIMM_TRAIN_ARGS (appended to
#   timm's, e.g. "--torchcompile"), STEADY_SKIP (updates at the start of the last epoch left out of the
#   steady-state figures: start-up, worker spin-up, compiles; default 10 on cuda, 3 on cpu), OURS_LOG_INTERVAL
#   (our --log-interval, default 10: the steady figures use its windows), ONLY=ours|timm (one side only), AUG (the
#   augmentation flags of both runs; default the card's: --aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --reprob 0
#   --mixup 0.8 --cutmix 1.0).
# Runtime: GPU (H100/H200), 4096 images: ~1 min per run including start-up. CPU smoke (tiny model, 200 images,
# 2 shared cores): ~1 min for both runs:
#   python scripts/bench/make_bench_data.py /tmp/bench_data --train 256 --val 0 && \
#   IMAGES=200 bash scripts/bench/bench_e2e.sh /tmp/bench_data
#
# Both runs train EPOCHS epochs over the same images with the same flags (documented command, no eval), so they
# take the same number of steps up to the random sequence-length draw. Reported per run, for the last epoch:
# steps, images/s, tokens/s and the fraction of step time spent waiting for data, (a) over the whole epoch (incl.
# its first steps) and (b) steady state: the epoch's updates from STEADY_SKIP on (start-up and compiles excluded).
# Ours: (a) from summary.csv (valid tokens); (b) from the train log's windows (one line per OURS_LOG_INTERVAL
# updates: img/s, tok/s, data wait of the window), combined time-weighted assuming equal tokens per update (the
# loader fills a token budget per step). timm: from its per-update log lines (--log-interval 1: time, images and
# data time of each update); timm logs no token counts, so its tokens/s is padded tokens (batch x L, the batch size
# telling L).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${1:?usage: bash scripts/bench/bench_e2e.sh DATA_DIR [WORKERS]}"
PY="${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}"
DEVICE="${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
if [ "$DEVICE" = "cuda" ]; then
    WORKERS="${2:-16}"; MODEL="${MODEL:-naflexvit_base_patch16_gap}"; BATCH="${BATCH:-64}"
    SEQ_LENS="${SEQ_LENS:-128 256 576 784 1024}"; DEV_FLAGS=(--amp --amp-dtype bfloat16); STEADY_SKIP="${STEADY_SKIP:-10}"
else
    WORKERS="${2:-2}"; MODEL="${MODEL:-naflexvit_tiny_test}"; BATCH="${BATCH:-8}"
    SEQ_LENS="${SEQ_LENS:-64 128}"; DEV_FLAGS=(--device cpu); STEADY_SKIP="${STEADY_SKIP:-3}"
fi
IMAGES="${IMAGES:-4096}"
EPOCHS="${EPOCHS:-1}"
OURS_LOG_INTERVAL="${OURS_LOG_INTERVAL:-10}"
read -r -a EXTRA_OURS <<< "${EXTRA_TRAIN_ARGS:-}"
read -r -a EXTRA_TIMM <<< "${TIMM_TRAIN_ARGS:-}"
OUT="${OUT:-bench/e2e}"
STAMP="$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[ -d "$DATA/train" ] || { echo "error: $DATA/train not found (make one: python scripts/bench/make_bench_data.py DIR)" >&2; exit 2; }
if [ -n "${TIMM_CHECKOUT:-}" ]; then
    [ -f "$TIMM_CHECKOUT/train.py" ] || { echo "error: TIMM_CHECKOUT=$TIMM_CHECKOUT has no train.py" >&2; exit 2; }
    cp "$TIMM_CHECKOUT/train.py" "$OUT/timm_train.py"  # run from $OUT, so it imports the installed timm
    TIMM_TRAIN="$OUT/timm_train.py"
else
    TIMM_TRAIN="$PWD/scripts/bench/timm_train.py"
fi

# Per-class subset as symlinks, so both runs read the same files.
ROOT="$("$PY" - "$DATA" "$OUT/data-$IMAGES" "$IMAGES" <<'EOF'
import math, os, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), int(sys.argv[3])
if n <= 0:
    print(src); sys.exit()
classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
per = math.ceil(n / len(classes))
for c in classes:
    (dst / "train" / c).mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "train" / c).iterdir())[:per]:
        link = dst / "train" / c / f.name
        if not link.exists():
            os.symlink(f, link)
print(dst)
EOF
)"

# The model card's command (+ EPOCHS epochs, no eval, log every step for the timm parser).
read -r -a AUG_FLAGS <<< "${AUG:---aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --reprob 0 --mixup 0.8 --cutmix 1.0}"
CARD=(--naflex-loader -b "$BATCH" --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates
      "${AUG_FLAGS[@]}" --weight-decay .1 --drop-path 0.2 --remode pixel -j "$WORKERS" --naflex-train-seq-lens $SEQ_LENS
      --epochs "$EPOCHS" --val-split "" --data-dir "$ROOT" --train-split train)
TIMM_MODEL=(--model "$MODEL")
if [ "$MODEL" = "naflexvit_tiny_test" ]; then  # same architecture in timm
    TIMM_MODEL=(--model naflexvit_base_patch16_gap --model-kwargs embed_dim=64 depth=2 num_heads=4)
fi
NUM_CLASSES="$(ls -d "$ROOT"/train/*/ | wc -l)"  # ours infers it from the folders; timm's train.py defaults to 1000
echo "== $STAMP  device $DEVICE  model $MODEL  -b $BATCH  L {$SEQ_LENS}  -j $WORKERS  epochs $EPOCHS  data $ROOT"
echo "   timm: $TIMM_TRAIN  ours extra: ${EXTRA_TRAIN_ARGS:-none}  timm extra: ${TIMM_TRAIN_ARGS:-none}  steady state from update $STEADY_SKIP"

ours_wall=0; timm_wall=0
if [ "${ONLY:-ours}" = ours ]; then
    t0=$(date +%s)
    "$PY" train.py "${CARD[@]}" "${DEV_FLAGS[@]}" --model "$MODEL" --log-interval "$OURS_LOG_INTERVAL" \
        ${EXTRA_OURS[@]+"${EXTRA_OURS[@]}"} \
        --output "$OUT" --experiment "ours-$STAMP" > "$OUT/ours-$STAMP.log" 2>&1 \
        || { echo "our train.py failed; see $OUT/ours-$STAMP.log" >&2; tail -5 "$OUT/ours-$STAMP.log" >&2; exit 1; }
    ours_wall=$(( $(date +%s) - t0 ))
fi
if [ "${ONLY:-timm}" = timm ]; then
    t0=$(date +%s)
    (cd "$OUT" && "$PY" "$TIMM_TRAIN" "${CARD[@]}" "${DEV_FLAGS[@]}" "${TIMM_MODEL[@]}" --num-classes "$NUM_CLASSES" \
        --log-interval 1 ${EXTRA_TIMM[@]+"${EXTRA_TIMM[@]}"} \
        --output . --experiment "timm-$STAMP") > "$OUT/timm-$STAMP.log" 2>&1 \
        || { echo "timm's training failed; see $OUT/timm-$STAMP.log" >&2; tail -5 "$OUT/timm-$STAMP.log" >&2; exit 1; }
    timm_wall=$(( $(date +%s) - t0 ))
fi

"$PY" - "$OUT/ours-$STAMP/summary.csv" "$OUT/timm-$STAMP.log" "$ours_wall" "$timm_wall" "$BATCH" "$SEQ_LENS" \
    "$OUT/ours-$STAMP.log" "$STEADY_SKIP" <<'EOF'
import csv, os, re, sys
summary, timm_log, ours_wall, timm_wall, b, seq_lens, ours_log, skip = sys.argv[1:]
seq_lens, skip = [int(s) for s in seq_lens.split()], int(skip)
budget = int(b) * max(seq_lens)
bs_to_L = {max(1, budget // L // 8 * 8): L for L in seq_lens}


def snap(n):
    """timm logs an update's time to 1 ms: time x rate recovers its batch size to within ~1%; snap to the
    schedule's batch sizes (a partial last batch stays as it is, counted at the longest L)."""
    near = min(bs_to_L, key=lambda k: abs(k - n))
    return near if abs(near - n) <= max(1, 0.02 * near) else n


def fmt(d):
    st = (f"{d['st_steps']:7d} {d['st_img_s']:9.1f} {d['st_tok_s']:11.0f} {100 * d['st_wait']:9.1f}%"
          if "st_img_s" in d else f"{'n/a':>7s} {'':9s} {'':11s} {'':10s}")
    return f"{d['steps']:6d} {d['img_s']:9.1f} {d['tok_s']:11.0f} {100 * d['wait']:9.1f}%  {st}"


ours = timm = None
if os.path.exists(summary):
    row = list(csv.DictReader(open(summary)))[-1]  # the last epoch
    text = open(ours_log).read()
    m = re.search(r"(\d+) steps/epoch", text)
    ours = dict(steps=int(m.group(1)) if m else -1, img_s=float(row["images_per_s"]),
                tok_s=float(row["tokens_per_s"]), wait=float(row["data_wait"]))
    # steady: windows between consecutive log lines of the last epoch that start at update >= skip; window
    # time ~ updates / tok_s (equal tokens per update), so rates combine weighted by updates / tok_s.
    lines = [(int(e), int(i), float(r), float(t), float(w)) for e, i, r, t, w in re.findall(
        r"Train: (\d+) \[\s*(\d+)/\d+.*?([\d.]+) img/s\s+([\d.]+) tok/s\s+data wait (\d+)%", text)]
    last = max((e for e, *_ in lines), default=0)
    lines = [x for x in lines if x[0] == last]
    win = [(i - p, r, t, w / 100) for (_, p, *_), (_, i, r, t, w) in zip(lines, lines[1:]) if p + 1 >= skip and t > 0]
    if win:
        wt = [n / t for n, _, t, _ in win]
        ours.update(st_steps=sum(n for n, *_ in win),
                    st_img_s=sum(x * r for x, (_, r, _, _) in zip(wt, win)) / sum(wt),
                    st_tok_s=sum(n for n, *_ in win) / sum(wt),
                    st_wait=sum(x * w for x, (*_, w) in zip(wt, win)) / sum(wt))
if os.path.exists(timm_log):
    pat = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?Time: ([\d.]+)s,\s+([\d.]+)/s.*?Data: ([\d.]+) ")
    steps = [(int(e), int(i), float(t), float(r), float(d)) for e, i, _, t, r, d in pat.findall(open(timm_log).read())]
    if not steps:
        sys.exit(f"no timm Train: lines parsed from {timm_log}; see that log")
    last = max(e for e, *_ in steps)
    steps = [x for x in steps if x[0] == last]

    def rates(sel):
        time_s = sum(t for _, _, t, _, _ in sel)
        imgs = [snap(round(t * r)) for _, _, t, r, _ in sel]
        tok = sum(n * bs_to_L.get(n, max(seq_lens)) for n in imgs)
        return len(sel), sum(imgs) / time_s, tok / time_s, sum(d for *_, d in sel) / time_s
    timm = dict(zip(("steps", "img_s", "tok_s", "wait"), rates(steps)))
    steady = [x for x in steps if x[1] >= skip]
    if steady:
        timm.update(zip(("st_steps", "st_img_s", "st_tok_s", "st_wait"), rates(steady)))
print(f"last epoch: whole epoch | steady state (updates >= {skip})")
print(f"{'':6s} {'steps':>6s} {'img/s':>9s} {'tokens/s':>11s} {'data wait':>10s}  {'steps':>7s} {'img/s':>9s} "
      f"{'tokens/s':>11s} {'data wait':>10s} {'wall s':>7s}")
if ours:
    print(f"{'ours':6s} {fmt(ours)} {int(ours_wall):7d}  (valid tokens)")
if timm:
    print(f"{'timm':6s} {fmt(timm)} {int(timm_wall):7d}  (padded tokens)")
if ours and timm:
    print(f"ratio ours/timm images/s: {ours['img_s'] / timm['img_s']:.2f}x")
    if "st_img_s" in ours and "st_img_s" in timm:
        print(f"ratio ours/timm images/s, steady state: {ours['st_img_s'] / timm['st_img_s']:.2f}x")
EOF
echo "logs: $OUT/ours-$STAMP.log  $OUT/timm-$STAMP.log"

# Validation speed on the same images: our validate.py vs timm's validate.py --naflex-loader, our last.pth
# (timm's validate.py comes only with TIMM_CHECKOUT; SKIP_VALIDATE=1 skips this part).
[ "${SKIP_VALIDATE:-0}" = "1" ] || [ -n "${ONLY:-}" ] && exit 0
CKPT="$OUT/ours-$STAMP/last.pth"
NUM_IMAGES="$(find -L "$ROOT/train" -type f | wc -l)"
if [ "$DEVICE" = "cuda" ]; then VAL_LEN="${VAL_LEN:-576}"; VB=256; else VAL_LEN="${VAL_LEN:-128}"; VB=32; fi
t0=$(date +%s)
"$PY" validate.py --data-dir "$ROOT" --split train --model "$MODEL" --checkpoint "$CKPT" \
    --naflex-max-seq-len "$VAL_LEN" -b "$VB" -j "$WORKERS" "${DEV_FLAGS[@]}" > "$OUT/ours-val-$STAMP.log" 2>&1 \
    || { echo "our validate.py failed; see $OUT/ours-val-$STAMP.log" >&2; exit 1; }
ours_val_wall=$(( $(date +%s) - t0 ))
timm_val_wall=0
if [ -n "${TIMM_CHECKOUT:-}" ]; then
    cp "$TIMM_CHECKOUT/validate.py" "$OUT/timm_validate.py"
    TIMM_DEV=("${DEV_FLAGS[@]}")
    t0=$(date +%s)
    (cd "$OUT" && "$PY" timm_validate.py "$ROOT" --split train "${TIMM_MODEL[@]}" --checkpoint "$CKPT" \
        --num-classes "$NUM_CLASSES" --naflex-loader --naflex-max-seq-len "$VAL_LEN" -b "$VB" -j "$WORKERS" \
        --log-freq 1 "${TIMM_DEV[@]}") > "$OUT/timm-val-$STAMP.log" 2>&1 \
        || { echo "timm's validate.py failed; see $OUT/timm-val-$STAMP.log" >&2; tail -5 "$OUT/timm-val-$STAMP.log" >&2; exit 1; }
    timm_val_wall=$(( $(date +%s) - t0 ))
fi
"$PY" - "$OUT/ours-val-$STAMP.log" "$OUT/timm-val-$STAMP.log" "$NUM_IMAGES" "$ours_val_wall" "$timm_val_wall" \
    "$VAL_LEN" <<'EOF'
import os, re, sys
ours_log, timm_log, n, ow, tw, L = sys.argv[1:]
m = re.search(r"top1\s+([\d.]+).*?images (\d+).*?([\d.]+) img/s", open(ours_log).read())
print(f"validation at L={L} on {n} images (img/s over the eval loop; wall incl. start-up)")
print(f"ours  {float(m.group(3)):9.1f} img/s  top1 {m.group(1)}  wall {ow}s")
if os.path.exists(timm_log):
    times = [float(t) for t in re.findall(r"Test: \[\s*\d+/\d+\]\s+Time: ([\d.]+)s", open(timm_log).read())]
    acc = re.findall(r"\* Acc@1 ([\d.]+)", open(timm_log).read())
    timm_rate = int(n) / sum(times) if times else float("nan")
    print(f"timm  {timm_rate:9.1f} img/s  top1 {acc[-1] if acc else '?'}  wall {tw}s")
    print(f"ratio ours/timm validation images/s: {float(m.group(3)) / timm_rate:.2f}x")
else:
    print("timm  (its validate.py is not in the pip package: set TIMM_CHECKOUT to compare)")
EOF
