#!/usr/bin/env bash
# End-to-end training throughput: our train.py vs timm's train.py, the model card's flags, same image folder.
#
#   bash scripts/bench_e2e.sh TIMM_CHECKOUT DATA_DIR [WORKERS]
#     TIMM_CHECKOUT  a clone of github.com/huggingface/pytorch-image-models (its train.py is copied out and run
#                    against the installed timm package, so the reference is the installed timm 1.0.31)
#     DATA_DIR       ImageNet-layout folder with train/<class>/*.jpg (e.g. ../shared/data/caltech101)
#     WORKERS        loader workers per run (default 16 on GPU, 2 on CPU)
#   Environment: IMAGES (train images used, a per-class subset; default 4096, 0 = all), DEVICE (cuda if present),
#   MODEL (default naflexvit_base_patch16_gap on cuda, naflexvit_tiny_test on cpu), BATCH (-b, default 64 on
#   cuda, 8 on cpu), SEQ_LENS (default "128 256 576 784 1024" on cuda, "64 128" on cpu), OUT (bench/e2e).
# Runtime: GPU (H100/H200), 4096 images: ~2-3 min per run including start-up, + ~1 min for the validation part.
# CPU smoke (tiny model, IMAGES=200, measured 45 s on 2 shared cores):
#   IMAGES=200 bash scripts/bench_e2e.sh ../.snapshots/pytorch-image-models demo_data
#
# Both runs train one epoch over the same images with the same flags (documented command + --epochs 1, no eval),
# so they take the same number of steps up to the random sequence-length draw. Reported per run: steps, images/s
# and tokens/s over the whole epoch (incl. the first steps), and the fraction of step time spent waiting for data.
# Ours: from summary.csv (valid tokens). timm: from its per-step log lines (--log-interval 1: time, images and
# data time of each update); timm does not log token counts, so its tokens/s is padded tokens (batch x L).
# Then both validate.py scripts score our last.pth on the same images (SKIP_VALIDATE=1 skips this part).
set -euo pipefail
cd "$(dirname "$0")/.."
TIMM_DIR="${1:?usage: bash scripts/bench_e2e.sh TIMM_CHECKOUT DATA_DIR [WORKERS]}"
DATA="${2:?usage: bash scripts/bench_e2e.sh TIMM_CHECKOUT DATA_DIR [WORKERS]}"
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
if [ "$DEVICE" = "cuda" ]; then
    WORKERS="${3:-16}"; MODEL="${MODEL:-naflexvit_base_patch16_gap}"; BATCH="${BATCH:-64}"
    SEQ_LENS="${SEQ_LENS:-128 256 576 784 1024}"; DEV_FLAGS=(--amp --amp-dtype bfloat16)
else
    WORKERS="${3:-2}"; MODEL="${MODEL:-naflexvit_tiny_test}"; BATCH="${BATCH:-8}"
    SEQ_LENS="${SEQ_LENS:-64 128}"; DEV_FLAGS=(--device cpu)
fi
IMAGES="${IMAGES:-4096}"
OUT="${OUT:-bench/e2e}"
STAMP="$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
[ -f "$TIMM_DIR/train.py" ] || { echo "error: $TIMM_DIR/train.py not found" >&2; exit 2; }
cp "$TIMM_DIR/train.py" "$OUT/timm_train.py"

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

# The model card's command (+ one epoch, no eval, log every step for the timm parser).
CARD=(--naflex-loader -b "$BATCH" --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates
      --aa rand-m8-inc1-mstd1.0 --weight-decay .1 --grayscale-prob .1 --drop-path 0.2 --reprob 0
      --mixup 0.8 --cutmix 1.0 --remode pixel -j "$WORKERS" --naflex-train-seq-lens $SEQ_LENS
      --epochs 1 --val-split "" --data-dir "$ROOT" --train-split train)
TIMM_MODEL=(--model "$MODEL")
if [ "$MODEL" = "naflexvit_tiny_test" ]; then  # same architecture in timm
    TIMM_MODEL=(--model naflexvit_base_patch16_gap --model-kwargs embed_dim=64 depth=2 num_heads=4)
fi
echo "== $STAMP  device $DEVICE  model $MODEL  -b $BATCH  L {$SEQ_LENS}  -j $WORKERS  data $ROOT"

t0=$(date +%s)
"$PY" train.py "${CARD[@]}" "${DEV_FLAGS[@]}" --model "$MODEL" --log-interval 10 \
    --output "$OUT" --experiment "ours-$STAMP" > "$OUT/ours-$STAMP.log" 2>&1 \
    || { echo "our train.py failed; see $OUT/ours-$STAMP.log" >&2; tail -5 "$OUT/ours-$STAMP.log" >&2; exit 1; }
ours_wall=$(( $(date +%s) - t0 ))
t0=$(date +%s)
TIMM_DEV=("${DEV_FLAGS[@]}")
if [ "$DEVICE" != "cuda" ]; then TIMM_DEV=(--device cpu); fi
NUM_CLASSES="$(ls -d "$ROOT"/train/*/ | wc -l)"  # ours infers it from the folders; timm defaults to 1000
(cd "$OUT" && "$PY" timm_train.py "${CARD[@]}" "${TIMM_DEV[@]}" "${TIMM_MODEL[@]}" --num-classes "$NUM_CLASSES" \
    --log-interval 1 \
    --output . --experiment "timm-$STAMP") > "$OUT/timm-$STAMP.log" 2>&1 \
    || { echo "timm's train.py failed; see $OUT/timm-$STAMP.log" >&2; tail -5 "$OUT/timm-$STAMP.log" >&2; exit 1; }
timm_wall=$(( $(date +%s) - t0 ))

"$PY" - "$OUT/ours-$STAMP/summary.csv" "$OUT/timm-$STAMP.log" "$ours_wall" "$timm_wall" "$BATCH" "$SEQ_LENS" \
    "$OUT/ours-$STAMP.log" <<'EOF'
import csv, re, sys
summary, timm_log, ours_wall, timm_wall, b, seq_lens, ours_log = sys.argv[1:]
seq_lens = [int(s) for s in seq_lens.split()]
budget = int(b) * max(seq_lens)
bs_to_L = {max(1, budget // L // 8 * 8): L for L in seq_lens}
row = list(csv.DictReader(open(summary)))[0]
m = re.search(r"(\d+) steps/epoch", open(ours_log).read())
ours = dict(steps=int(m.group(1)) if m else -1, img_s=float(row["images_per_s"]),
            tok_s=float(row["tokens_per_s"]), wait=float(row["data_wait"]))
pat = re.compile(r"Train: \d+ \[\s*(\d+)/(\d+).*?Time: ([\d.]+)s,\s+([\d.]+)/s.*?Data: ([\d.]+) ")
steps = [(float(t), float(r), float(d)) for _, _, t, r, d in pat.findall(open(timm_log).read())]
if not steps:
    sys.exit(f"no timm Train: lines parsed from {timm_log}; see that log")
time_s = sum(t for t, _, _ in steps)
imgs = [round(t * r) for t, r, _ in steps]
tok = sum(n * bs_to_L.get(n, max(seq_lens)) for n in imgs)
timm = dict(steps=len(steps), img_s=sum(imgs) / time_s, tok_s=tok / time_s, wait=sum(d for *_, d in steps) / time_s)
print(f"{'':6s} {'steps':>6s} {'img/s':>9s} {'tokens/s':>11s} {'data wait':>10s} {'wall s':>7s}")
print(f"{'ours':6s} {ours['steps']:6d} {ours['img_s']:9.1f} {ours['tok_s']:11.0f} {100 * ours['wait']:9.1f}% {int(ours_wall):7d}  (valid tokens)")
print(f"{'timm':6s} {timm['steps']:6d} {timm['img_s']:9.1f} {timm['tok_s']:11.0f} {100 * timm['wait']:9.1f}% {int(timm_wall):7d}  (padded tokens)")
print(f"ratio ours/timm images/s: {ours['img_s'] / timm['img_s']:.2f}x")
EOF
echo "logs: $OUT/ours-$STAMP.log  $OUT/timm-$STAMP.log"

# Validation speed on the same images: our validate.py vs timm's validate.py --naflex-loader, our last.pth.
[ "${SKIP_VALIDATE:-0}" = "1" ] && exit 0
cp "$TIMM_DIR/validate.py" "$OUT/timm_validate.py"
CKPT="$(cd "$OUT/ours-$STAMP" && pwd)/last.pth"
NUM_IMAGES="$(find -L "$ROOT/train" -type f | wc -l)"
if [ "$DEVICE" = "cuda" ]; then VAL_LEN="${VAL_LEN:-576}"; VB=256; else VAL_LEN="${VAL_LEN:-128}"; VB=32; fi
t0=$(date +%s)
"$PY" validate.py --data-dir "$ROOT" --split train --model "$MODEL" --checkpoint "$CKPT" \
    --naflex-max-seq-len "$VAL_LEN" -b "$VB" -j "$WORKERS" "${DEV_FLAGS[@]}" > "$OUT/ours-val-$STAMP.log" 2>&1 \
    || { echo "our validate.py failed; see $OUT/ours-val-$STAMP.log" >&2; exit 1; }
ours_val_wall=$(( $(date +%s) - t0 ))
t0=$(date +%s)
(cd "$OUT" && "$PY" timm_validate.py "$ROOT" --split train "${TIMM_MODEL[@]}" --checkpoint "$CKPT" \
    --num-classes "$NUM_CLASSES" --naflex-loader --naflex-max-seq-len "$VAL_LEN" -b "$VB" -j "$WORKERS" \
    --log-freq 1 "${TIMM_DEV[@]}") > "$OUT/timm-val-$STAMP.log" 2>&1 \
    || { echo "timm's validate.py failed; see $OUT/timm-val-$STAMP.log" >&2; tail -5 "$OUT/timm-val-$STAMP.log" >&2; exit 1; }
timm_val_wall=$(( $(date +%s) - t0 ))
"$PY" - "$OUT/ours-val-$STAMP.log" "$OUT/timm-val-$STAMP.log" "$NUM_IMAGES" "$ours_val_wall" "$timm_val_wall" \
    "$VAL_LEN" <<'EOF'
import re, sys
ours_log, timm_log, n, ow, tw, L = sys.argv[1:]
m = re.search(r"top1\s+([\d.]+).*?images (\d+).*?([\d.]+) img/s", open(ours_log).read())
times = [float(t) for t in re.findall(r"Test: \[\s*\d+/\d+\]\s+Time: ([\d.]+)s", open(timm_log).read())]
acc = re.findall(r"\* Acc@1 ([\d.]+)", open(timm_log).read())
timm_rate = int(n) / sum(times) if times else float("nan")
print(f"validation at L={L} on {n} images (img/s over the eval loop; wall incl. start-up)")
print(f"ours  {float(m.group(3)):9.1f} img/s  top1 {m.group(1)}  wall {ow}s")
print(f"timm  {timm_rate:9.1f} img/s  top1 {acc[-1] if acc else '?'}  wall {tw}s")
print(f"ratio ours/timm validation images/s: {float(m.group(3)) / timm_rate:.2f}x")
EOF
