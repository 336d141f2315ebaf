#!/usr/bin/env python3
"""Where the NaFlex train loader's CPU time goes, per image and per stage: ours and timm 1.0.31's, same images.

Command (the documented augmentations; ~15-25 s on 2 shared cores with the defaults):
    python scripts/bench/profile_loader.py --data-dir ../shared/data/caltech101 \
        --aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --mixup 0.8 --cutmix 1.0 -b 64 \
        --naflex-train-seq-lens 128 256 576 784 1024
    (those are the defaults: ``python scripts/bench/profile_loader.py`` alone does the same; --json FILE saves the table)
Runtime: ~15-25 s with caltech101 (3 cycles x 5 sequence lengths, 1/4 of each step's images = 768 images per
pipeline, plus the whole-call cross-check); ``--cycles 1 --fraction 0.03`` takes ~5 s.

What it does: one process, one thread (like one DataLoader worker), no workers. Steps follow the training schedule's
shape (each sequence length L in turn, batch = floor(b x max(L) / L / 8) * 8, of which ``--fraction`` is processed,
so small-L steps keep their larger share of images). Each sample goes through our pipeline stage by stage
(loaders.decode / augment public functions in the order loaders.pipeline.TrainSampleBuilder and
loaders.train_loader.StepDataset call them; tests/test_profile_loader.py checks the staged result is pixel-identical
to TrainSampleBuilder's), then batch MixUp/CutMix and packing. timm's pipeline is timed the same way on the same
(path, L) pairs: PIL decode + convert('RGB') (timm's ImageDataset), each transform of timm's NaFlex train transform
(create_transform(naflex=True, use_prefetcher=True), as create_naflex_loader builds it), NaFlexMixup, Patchify,
NaFlexCollator. Not included: DataLoader IPC (worker -> main process), pinning, the device copy.

Stage notes. Ours decodes with JPEG draft (reduced DCT) and crops+resizes in one Pillow call: "decode" is
decode_resized minus the time inside Image.resize, "RRC resize" is that Image.resize time. Ours patchifies while
packing (one copy into the batch buffer), so patchify and collate are one row. timm's RandAugment may raise on
Posterize(0 bits) with Pillow >= 12: such samples are dropped, as timm's loader does, and counted.
NaViT arXiv:2307.06304 (packing), SigLIP 2 arXiv:2502.14786 (NaFlex).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from augment.geometry import sample_rrc  # noqa: E402
from augment.mixup import mix_variable_size  # noqa: E402
from augment.photometric import color_jitter, random_grayscale  # noqa: E402
from augment.policy import ImageAugment  # noqa: E402
from naflex.train.cli import build_parser, config_from_args  # noqa: E402
from loaders.dataset import ImageFolderDataset  # noqa: E402
from loaders.decode import decode_resized, open_image, pil_to_hwc  # noqa: E402
from loaders.packing import pack  # noqa: E402
from loaders.schedule import batch_size_for  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "caltech101"
DOCUMENTED = dict(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.1, mixup=0.8, cutmix=1.0, batch_size=64, reprob=0.0)


class StageTimer:
    """Accumulates seconds per stage name (insertion order kept for the table)."""

    def __init__(self):
        self.s = OrderedDict()

    def add(self, name, dt):
        self.s[name] = self.s.get(name, 0.0) + dt


class _ResizeClock:
    """Times Image.Image.resize while ``on``: splits our fused decode+crop-resize call into its two parts."""

    def __init__(self):
        self.on = False
        self.t = 0.0
        self._orig = Image.Image.resize
        clock = self

        def resize(img, *a, **k):
            if not clock.on:
                return clock._orig(img, *a, **k)
            t0 = time.perf_counter()
            try:
                return clock._orig(img, *a, **k)
            finally:
                clock.t += time.perf_counter() - t0

        Image.Image.resize = resize

    def restore(self):
        Image.Image.resize = self._orig


def our_sample(path, L, P, augment: ImageAugment, rng: random.Random, timer: StageTimer, clock: _ResizeClock):
    """Our per-sample pipeline stage by stage; same calls and RNG order as loaders.pipeline.TrainSampleBuilder."""
    cfg = augment.cfg
    interps = cfg.interpolations()
    t0 = time.perf_counter()
    opened = open_image(path)
    t1 = time.perf_counter()
    timer.add("read + header/EXIF", t1 - t0)
    _, h, w, _ = opened
    crop = sample_rrc(h, w, rng, patch_size=P, max_seq_len=L, scale=cfg.scale, ratio=cfg.ratio)
    interp = interps[0] if len(interps) == 1 else rng.choice(interps)
    t2 = time.perf_counter()
    timer.add("RRC params", t2 - t1)
    clock.t, clock.on = 0.0, True
    try:
        img = decode_resized(path, (crop.top, crop.left, crop.height, crop.width),
                             (crop.grid_h * P, crop.grid_w * P), interp, draft=cfg.draft, opened=opened)
    finally:
        clock.on = False
    t3 = time.perf_counter()
    timer.add("decode (JPEG draft)", t3 - t2 - clock.t)
    timer.add("RRC resize", clock.t)
    # augment.policy.ImageAugment.__call__, one stage at a time (flip -> RandAugment -> jitter -> grayscale)
    if cfg.hflip > 0 and rng.random() < cfg.hflip:
        img = TF.horizontal_flip(img)
    t4 = time.perf_counter()
    timer.add("flip", t4 - t3)
    if augment.rand_augment is not None:
        img = augment.rand_augment(img, rng)
    t5 = time.perf_counter()
    timer.add("RandAugment", t5 - t4)
    if augment.jitter is not None:
        img = color_jitter(img, augment.jitter, rng)
    if cfg.grayscale_prob > 0:
        img = random_grayscale(img, cfg.grayscale_prob, rng)
    t6 = time.perf_counter()
    timer.add("jitter/grayscale", t6 - t5)
    x = pil_to_hwc(img)
    timer.add("to uint8 tensor", time.perf_counter() - t6)
    return x


def our_step(samples, L, P, augment, mix_cfg, seed, step_idx, timer, clock):
    """One step like loaders.train_loader.StepDataset.__getitem__ (per-slot RNGs, MixUp/CutMix, erasing, pack)."""
    imgs, targets, rngs = [], [], []
    for slot, (path, target) in enumerate(samples):
        rng = random.Random(f"{seed}/0/{step_idx}/{slot}")
        imgs.append(our_sample(path, L, P, augment, rng, timer, clock))
        targets.append(target)
        rngs.append(rng)
    t0 = time.perf_counter()
    if mix_cfg is not None:
        imgs, _, _, _ = mix_variable_size(imgs, targets, mix_cfg, random.Random(f"{seed}/0/{step_idx}/mix"),
                                          inplace=True, epoch=0)
    t1 = time.perf_counter()
    timer.add("MixUp/CutMix", t1 - t0)
    if augment.erasing is not None:
        imgs = [augment.erasing(x, r, P) for x, r in zip(imgs, rngs)]
    t2 = time.perf_counter()
    timer.add("random erasing", t2 - t1)
    batch = pack(imgs, P)
    timer.add("patchify + collate (pack)", time.perf_counter() - t2)
    return int(batch["seq_lens"].sum())


class TimmPipeline:
    """timm 1.0.31's NaFlex train pipeline (create_naflex_loader's pieces), one stage at a time."""

    def __init__(self, args, seq_lens, P, num_classes):
        from timm.data import create_transform
        from timm.data.naflex_dataset import NaFlexCollator
        from timm.data.naflex_mixup import NaFlexMixup
        from timm.data.naflex_transforms import Patchify

        self.tf = {L: create_transform(
            is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
            color_jitter=args.color_jitter, grayscale_prob=args.grayscale_prob, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, use_prefetcher=True, naflex=True, patch_size=P,
            max_seq_len=L).transforms for L in seq_lens}
        self.collate = {L: NaFlexCollator(L) for L in seq_lens}
        self.patchify = Patchify(patch_size=P, flatten_patches=True, channels_last=True)
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = NaFlexMixup(num_classes=num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                     switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                                     label_smoothing=args.smoothing)
        self.dropped = 0

    @staticmethod
    def stage_name(t):
        names = {"RandomResizedCropToSequence": "RRC to sequence (crop + resize)",
                 "RandomHorizontalFlip": "flip", "RandAugment": "RandAugment", "RandomGrayscale": "jitter/grayscale",
                 "ColorJitter": "jitter/grayscale", "MaybePILToTensor": "to uint8 tensor"}
        return names.get(type(t).__name__, type(t).__name__)

    def sample(self, path, L, timer):
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            img = Image.open(f)
            img = img.convert("RGB")
        t1 = time.perf_counter()
        timer.add("decode (full) + convert RGB", t1 - t0)
        for t in self.tf[L]:
            ts = time.perf_counter()
            try:
                img = t(img)
            except Exception:  # timm's wrapper warns and skips the sample
                timer.add(self.stage_name(t), time.perf_counter() - ts)
                self.dropped += 1
                return None
            timer.add(self.stage_name(t), time.perf_counter() - ts)
        return img

    def step(self, samples, L, timer):
        imgs, targets = [], []
        for path, target in samples:
            x = self.sample(path, L, timer)
            if x is not None:
                imgs.append(x)
                targets.append(target)
        t0 = time.perf_counter()
        tg = torch.tensor(targets, dtype=torch.int64)
        if self.mixup is not None:
            imgs, tg = self.mixup(imgs, tg)
        t1 = time.perf_counter()
        timer.add("MixUp/CutMix", t1 - t0)
        patches = [self.patchify(x) for x in imgs]
        t2 = time.perf_counter()
        timer.add("patchify", t2 - t1)
        batch, _ = self.collate[L](list(zip(patches, tg)))
        timer.add("collate (pad to L, float32)", time.perf_counter() - t2)
        return int(batch["patch_valid"].sum())


def plan_steps(num_images, seq_lens, batch_size, cycles, fraction, seed):
    """[(L, [dataset indices])]: each L in turn, ``fraction`` of the step's real batch, seeded random images."""
    rng = random.Random(seed)
    order = list(range(num_images))
    rng.shuffle(order)
    budget = batch_size * max(seq_lens)
    steps, pos = [], 0
    for _ in range(cycles):
        for L in seq_lens:
            n = max(2, int(round(batch_size_for(L, budget) * fraction)))
            idx = [order[(pos + i) % num_images] for i in range(n)]
            pos += n
            steps.append((L, idx))
    return steps


def table(name, timer, n_img, tokens, wall):
    total = sum(timer.s.values())
    rows = [f"| {name}: stage | ms/image | % |", "|---|---:|---:|"]
    for k, v in timer.s.items():
        rows.append(f"| {k} | {1e3 * v / n_img:.2f} | {100 * v / total:.1f} |")
    rows.append(f"| **total (sum of stages)** | **{1e3 * total / n_img:.2f}** | 100 |")
    rows.append(f"\n{name}: {n_img} images, {tokens / n_img:.0f} valid tokens/image, {n_img / total:.0f} img/s and "
                f"{tokens / total / 1e3:.1f}k valid tokens/s per core (wall {wall:.1f}s incl. timing overhead)")
    return "\n".join(rows)


def main(argv=None):
    p = build_parser(("dataset", "aug", "naflex", "run"), prog="profile_loader.py")
    p.description = __doc__.split("\n")[0]
    p.set_defaults(data_dir=str(DEFAULT_DATA), **DOCUMENTED)
    p.add_argument("--cycles", type=int, default=3, help="passes over the sequence-length list")
    p.add_argument("--fraction", type=float, default=0.25, help="share of each step's images processed")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--only", choices=("ours", "timm"), default=None)
    p.add_argument("--no-check", action="store_true", help="skip the whole-call cross-check")
    p.add_argument("--json", default="", help="write stage seconds and counts to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # like one DataLoader worker
    ds = ImageFolderDataset(args.data_dir, args.train_split)
    P, seq_lens = args.patch_size, list(args.naflex_train_seq_lens)
    steps = plan_steps(len(ds), seq_lens, args.batch_size, args.cycles, args.fraction, args.seed)
    n_total = sum(len(i) for _, i in steps)
    cfg = config_from_args(args, p)
    aug_cfg = cfg.aug
    mix_cfg = None if cfg.mixup is None else dataclasses.replace(cfg.mixup, num_classes=ds.num_classes)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import PIL
    header = (f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} ({cpu}, {os.cpu_count()} cpus), python "
              f"{platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}; {args.data_dir} "
              f"[{args.train_split}], L {seq_lens}, -b {args.batch_size}, aa {args.aa}, grayscale {args.grayscale_prob}, "
              f"mixup {args.mixup}/cutmix {args.cutmix}, reprob {args.reprob}; {len(steps)} steps, {n_total} images "
              f"per pipeline, 1 thread")
    print(header, flush=True)
    out = {"header": header, "pipelines": {}}
    for _, idx in steps:  # page cache: neither pipeline pays the first read from disk
        for i in idx:
            with open(ds.path(i), "rb") as f:
                f.read()
    clock = _ResizeClock()
    try:
        kinds = [args.only] if args.only else ["ours", "timm"]
        for kind in kinds:
            timer = StageTimer()
            tokens = 0
            t0 = time.perf_counter()
            if kind == "ours":
                augment = ImageAugment(aug_cfg)
                for s, (L, idx) in enumerate(steps):
                    tokens += our_step([ds[i] for i in idx], L, P, augment, mix_cfg, args.seed, s, timer, clock)
                n_img = n_total
            else:
                random.seed(args.seed)
                torch.manual_seed(args.seed)
                tp = TimmPipeline(args, seq_lens, P, ds.num_classes)
                for L, idx in steps:
                    tokens += tp.step([ds[i] for i in idx], L, timer)
                n_img = n_total - tp.dropped
            wall = time.perf_counter() - t0
            print("\n" + table(kind, timer, n_img, tokens, wall), flush=True)
            if kind == "timm" and tp.dropped:
                print(f"timm dropped {tp.dropped} samples (transform raised; timm's loader skips them)")
            rec = {"stages_s": dict(timer.s), "images": n_img, "valid_tokens": tokens, "wall_s": wall}
            if not args.no_check:
                rec["whole_call_ms_per_image"] = whole_call(kind, steps, ds, P, aug_cfg, args, seq_lens)
                print(f"{kind}: the per-sample pipeline called whole (no stage timers): "
                      f"{rec['whole_call_ms_per_image']:.2f} ms/image (its stages above, without batch stages: "
                      f"{per_sample_ms(kind, timer, n_img):.2f})", flush=True)
            out["pipelines"][kind] = rec
    finally:
        clock.restore()
    if len(out["pipelines"]) == 2:
        o, t = out["pipelines"]["ours"], out["pipelines"]["timm"]
        ours_ms = 1e3 * sum(o["stages_s"].values()) / o["images"]
        timm_ms = 1e3 * sum(t["stages_s"].values()) / t["images"]
        o_tok = o["valid_tokens"] / sum(o["stages_s"].values())
        t_tok = t["valid_tokens"] / sum(t["stages_s"].values())
        print(f"\nours/timm: {timm_ms / ours_ms:.2f}x less CPU per image, {o_tok / t_tok:.2f}x valid tokens per "
              f"CPU-second; at this rate one core feeds {o_tok / 1e3:.0f}k (ours) / {t_tok / 1e3:.0f}k (timm) "
              f"valid tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


BATCH_STAGES = ("MixUp/CutMix", "random erasing", "patchify + collate (pack)", "patchify", "collate (pad to L, float32)")


def per_sample_ms(kind, timer, n_img):
    return 1e3 * sum(v for k, v in timer.s.items() if k not in BATCH_STAGES) / n_img


def whole_call(kind, steps, ds, P, aug_cfg, args, seq_lens):
    """ms/image of the real per-sample call (TrainSampleBuilder / timm's composed transform) on the same inputs."""
    n, t = 0, 0.0
    if kind == "ours":
        from loaders.pipeline import TrainSampleBuilder
        build = TrainSampleBuilder(aug_cfg)
        for s, (L, idx) in enumerate(steps):
            for slot, i in enumerate(idx):
                rng = random.Random(f"{args.seed}/0/{s}/{slot}")
                t0 = time.perf_counter()
                build(ds.path(i), L, P, rng)
                t += time.perf_counter() - t0
                n += 1
    else:
        from torchvision.transforms import Compose
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tp = TimmPipeline(args, seq_lens, P, ds.num_classes)
        for L, idx in steps:
            tf = Compose(tp.tf[L])
            for i in idx:
                t0 = time.perf_counter()
                try:
                    with open(ds.path(i), "rb") as f:
                        tf(Image.open(f).convert("RGB"))
                except Exception:
                    continue
                t += time.perf_counter() - t0
                n += 1
    return 1e3 * t / max(1, n)


if __name__ == "__main__":
    main()
