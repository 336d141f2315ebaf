#!/usr/bin/env python3
"""Evaluate a NaFlexViT checkpoint at one or more sequence lengths (thin CLI over naflex.train.evaluate).

    python validate.py --data-dir /imagenet --model naflexvit_base_patch16_gap \\
        --pretrained naflexvit_base_patch16_gap.e300_s576_in1k.safetensors \\
        --naflex-max-seq-len 256 576 1024 --amp --amp-dtype bfloat16 --results-file out.csv

Images keep their native aspect ratio and are resized to the largest patch grid that fits each sequence
length (NaFlex eval rule, SigLIP 2 arXiv:2502.14786; NaViT arXiv:2307.06304), exactly like timm's
``validate.py --naflex-loader --naflex-max-seq-len L``, so timm checkpoints score what timm reports. Batches
are packed (no padding) by default; ``--padded`` uses timm's padded layout and gives the same metrics.
Under ``torchrun`` each rank evaluates its own shard and every image is counted exactly once.
Accepts our checkpoints (plain, EMA via --use-ema, training-state files) and timm's .pth/.safetensors.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

AMP_DTYPES = ("bfloat16", "float16")


class ValidateError(Exception):
    """A user-facing problem reported as one line (bad path, unknown model, class mismatch, ...)."""


def build_parser() -> argparse.ArgumentParser:
    from loaders.config import EvalLoaderConfig
    from naflex.model import ATTN_BACKENDS, DEFAULT_MODEL
    ev = EvalLoaderConfig()
    p = argparse.ArgumentParser(description="Evaluate a NaFlexViT model at one or more sequence lengths.")
    p.add_argument("data", nargs="?", default=None, help="dataset root (same as --data-dir)")
    p.add_argument("--data-dir", default=None, help="dataset root holding <split>/<class>/*.jpg")
    p.add_argument("--split", default="val", help="split folder under the root (default: val)")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model name (naflex.list_models())")
    p.add_argument("--checkpoint", default="",
                   help="our checkpoint (plain/EMA/training state) or a timm .pth/.safetensors")
    p.add_argument("--pretrained", nargs="?", const=True, default=None,
                   help="pretrained weights file given to create_model (timm .safetensors/.pth or ours)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights ('state_dict_ema') of a checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--naflex-max-seq-len", type=int, nargs="+", default=[ev.max_seq_len],
                   help=f"one or more sequence lengths to evaluate at (default: {ev.max_seq_len})")
    p.add_argument("--naflex-loader", action="store_true", help="accepted for timm compatibility (always NaFlex)")
    p.add_argument("--padded", action="store_true", help="timm's padded batches instead of packed ones")
    p.add_argument("--exif-orientation", action="store_true",
                   help="turn images upright by their EXIF orientation tag (default: no, like timm)")
    p.add_argument("-b", "--batch-size", type=int, default=ev.batch_size,
                   help=f"images per batch (default: {ev.batch_size})")
    p.add_argument("-j", "--workers", type=int, default=ev.num_workers,
                   help=f"data loader workers (default: {ev.num_workers})")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    p.add_argument("--amp-dtype", default="bfloat16", choices=AMP_DTYPES, help="autocast dtype (default: bfloat16)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--attn-backend", default="auto", choices=ATTN_BACKENDS,
                   help="attention backend for packed batches (default: auto)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile the model")
    p.add_argument("--results-file", default="", help="write results to .csv or .json (by extension)")
    p.add_argument("--results-format", default=None, choices=("csv", "json"), help="override the file format")
    p.add_argument("--plot", default="", help="PNG of top-1 vs sequence length (default: next to --results-file)")
    p.add_argument("--log-freq", type=int, default=0, help="print progress every N batches (default: off)")
    return p


def _open_dataset(args):
    """ImageFolderDataset of the split (class order = sorted folder names, like timm / torchvision)."""
    from loaders import ImageFolderDataset

    root = args.data_dir or args.data
    if not root:
        raise ValidateError("no dataset given: pass --data-dir DIR")
    if not Path(root).is_dir():
        raise ValidateError(f"dataset folder not found: {root}")
    try:
        ds = ImageFolderDataset(root, args.split)
    except FileNotFoundError:
        # Like timm's folder datasets: a root that directly holds class folders is used as it is.
        try:
            ds = ImageFolderDataset(root, "")
        except (FileNotFoundError, OSError) as e:
            raise ValidateError(f"split '{args.split}' not found under {root}: {e}") from None
    if len(ds) == 0 or not ds.classes:
        raise ValidateError(f"no images found in {ds.base} (expected <class>/<image> folders)")
    return ds


def _read_checkpoint(path: str, use_ema: bool) -> dict:
    """State dict of any file naflex.model.weights reads (ours, timm's .pth / .safetensors); with --use-ema only the
    EMA copy ('state_dict_ema' / 'model_ema') is accepted, without it only the plain weights."""
    from naflex.model.weights import read_state_dict

    try:
        return read_state_dict(path, use_ema=use_ema, require_ema=use_ema)
    except (FileNotFoundError, ValueError) as e:
        raise ValidateError(str(e)) from None


def _create_model(args, num_dataset_classes: int):
    """Model with the checkpoint's weights loaded strictly; one-line errors for every mismatch."""
    import naflex

    try:
        naflex.get_config(args.model)  # unknown name: registry's message, before any checkpoint is read
    except ValueError as e:
        raise ValidateError(str(e)) from None
    if args.pretrained is True:
        raise ValidateError("nothing is downloaded: pass --pretrained PATH to a local weights file "
                            "(e.g. the model card's model.safetensors)")
    if args.checkpoint and args.pretrained:
        raise ValidateError("give either --checkpoint or --pretrained, not both")
    path = args.checkpoint or args.pretrained or ""
    if path and not Path(path).is_file():
        raise ValidateError(f"checkpoint file not found: {path}")
    state = _read_checkpoint(path, args.use_ema) if path else None
    num_classes = args.num_classes
    head = state.get("head.weight") if state else None
    if head is not None:
        if num_classes is not None and num_classes != head.shape[0]:
            raise ValidateError(f"class-count mismatch: --num-classes {num_classes} but {path} has a "
                                f"{head.shape[0]}-class head")
        num_classes = head.shape[0]
    if num_classes is None:
        num_classes = num_dataset_classes if not path else None
    try:
        model = naflex.create_model(args.model, **({} if num_classes is None else {"num_classes": num_classes}))
    except ValueError as e:
        raise ValidateError(str(e).splitlines()[0]) from None
    if state is not None:
        try:
            naflex.load_into(model, state, source=path)
        except naflex.WeightsMismatch as e:
            raise ValidateError(str(e)) from None
    else:
        print(f"note: no --checkpoint / --pretrained given: evaluating randomly initialized {args.model}")
    if model.num_classes != num_dataset_classes:
        raise ValidateError(
            f"class-count mismatch: the dataset has {num_dataset_classes} classes but the model has "
            f"{model.num_classes} outputs" + ("" if path else f" (pass --num-classes {num_dataset_classes})"))
    return model


def write_results(rows: list[dict], path: str, fmt: str | None = None) -> Path:
    """Write result rows to CSV or JSON (format from ``fmt`` or the file extension)."""
    out = Path(path)
    fmt = fmt or ("json" if out.suffix.lower() == ".json" else "csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    return out


def plot_results(rows: list[dict], path) -> Path | None:
    """PNG of top-1 against sequence length; returns None (and says so) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written")
        return None
    rows = sorted(rows, key=lambda r: r["seq_len"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["seq_len"] for r in rows], [r["top1"] for r in rows], marker="o")
    ax.set_xlabel("sequence length (patches)")
    ax.set_ylabel("top-1 (%)")
    ckpt = Path(rows[0]["checkpoint"]).name if rows[0].get("checkpoint") else "random init"
    ax.set_title(f"{rows[0]['model']} ({ckpt})", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args) -> list[dict]:
    import torch

    import naflex
    from loaders import make_eval_loader
    from naflex.train.distributed import init_distributed
    from naflex.train.evaluate import evaluate

    dataset = _open_dataset(args)
    model = _create_model(args, len(dataset.classes))
    try:
        dist_info = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:  # DeviceError (e.g. --device cuda without a GPU), process-group setup
        raise ValidateError(str(e)) from None
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = model.to(device).eval()
    patch_size = model.patch_size
    packing = not args.padded
    if packing and hasattr(model, "set_attn_backend"):
        model.set_attn_backend(args.attn_backend)
    norm = naflex.data_config(model)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, dynamic=True)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    checkpoint = args.checkpoint or (args.pretrained if isinstance(args.pretrained, str) else "")
    rows = []
    for seq_len in args.naflex_max_seq_len:
        loader = make_eval_loader(
            dataset, max_seq_len=seq_len, batch_size=args.batch_size, patch_size=patch_size,
            num_workers=args.workers, rank=rank, world_size=world_size, packing=packing,
            interpolation=norm["interpolation"], exif_orientation=args.exif_orientation,
            pin_memory=device.type == "cuda")
        m = evaluate(model, loader, device, amp_dtype=amp_dtype, world_size=world_size, mean=norm["mean"],
                     std=norm["std"], log_interval=args.log_freq)
        for path in m["bad_file_paths"]:
            print(f"bad image file (skipped): {path}", file=sys.stderr)
        row = {
            "model": args.model, "checkpoint": str(checkpoint), "seq_len": seq_len,
            "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "loss": round(m["loss"], 5),
            "images": m["images"], "bad_files": m["bad_files"],
            "images_per_s": round(m["images_per_s"], 2), "valid_tokens_per_s": round(m["valid_tokens_per_s"], 1),
            "packed": packing, "amp": args.amp_dtype if args.amp else "float32",
            "device": device.type, "world_size": world_size,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        rows.append(row)
        if rank == 0:
            print(f"seq_len {seq_len:5d}: top1 {row['top1']:7.3f}  top5 {row['top5']:7.3f}  loss {row['loss']:.4f}  "
                  f"images {row['images']}  bad files {row['bad_files']}  {row['images_per_s']:.1f} img/s  "
                  f"{row['valid_tokens_per_s']:.0f} valid tok/s", flush=True)
    if rank == 0:
        if args.results_file:
            print(f"results written to {write_results(rows, args.results_file, args.results_format)}")
        if len(rows) > 1:
            plot_path = args.plot or (str(Path(args.results_file).with_suffix(".png")) if args.results_file else "")
            if plot_path:
                out = plot_results(rows, plot_path)
                if out:
                    print(f"plot written to {out}")
            else:
                print("pass --plot FILE.png or --results-file to save a top-1 vs sequence length plot")
    return rows


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValidateError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from naflex.train.distributed import cleanup
            cleanup()


if __name__ == "__main__":
    main()
