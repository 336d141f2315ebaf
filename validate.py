#!/usr/bin/env python3
"""Evaluate a NaFlexViT checkpoint at one or more sequence lengths (thin CLI over naflex.train.evaluate).

    python validate.py --data-dir /imagenet --model naflexvit_base_patch16_gap.e300_s576_in1k \\
        --naflex-max-seq-len 256 576 1024 --amp --amp-dtype bfloat16 --results-file out.csv

With no ``--checkpoint`` the model's published weights are scored, as timm's validate.py does (timm's
``hf-hub:timm/NAME.TAG`` names work too). Class indices are timm's (natural order of the class folders); a checkpoint
of ours records its class names, and the dataset is read in that order (by name), so a folder whose classes sort
otherwise still scores right.
Images keep their native aspect ratio and are resized to the largest patch grid that fits each sequence
length (NaFlex eval rule, SigLIP 2 arXiv:2502.14786; NaViT arXiv:2307.06304), exactly like timm's
``validate.py --naflex-loader --naflex-max-seq-len L``, so timm checkpoints score what timm reports. Batches
are packed (no padding) by default; ``--padded`` uses timm's padded layout and gives the same metrics.
Under ``torchrun`` each rank evaluates its own shard and every image is counted exactly once.
Accepts our checkpoints (plain, EMA via --use-ema, training-state files) and timm's .pth/.safetensors. Reads
image folders and WebDataset tar shards (``--dataset wds/NAME``, timm's layout; loaders.shards).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["build_parser", "check_args", "main"]


class ValidateError(Exception):
    """A user-facing problem reported as one line (bad path, unknown model, class mismatch, ...)."""


class _Parser(argparse.ArgumentParser):
    """Flag mistakes are one line, like every other validate.py error."""

    def error(self, message):
        raise ValidateError(f"{message} (see validate.py --help)")


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the same config dataclasses as train.py's, so the two CLIs agree.
    from loaders.config import DatasetConfig, EvalLoaderConfig
    from naflex.model import ATTN_BACKENDS, DEFAULT_MODEL
    from naflex.train.cli import ParseKwargs
    from naflex.train.config import AMP_DTYPES, TrainConfig
    from naflex.train.timm_flags import VALIDATE_REFUSED, refuse
    ev, split, amp_dtype = EvalLoaderConfig(), DatasetConfig.val_split, TrainConfig.amp_dtype
    p = _Parser(description="Evaluate a NaFlexViT model at one or more sequence lengths.")
    p.add_argument("data", nargs="?", default=None, help="dataset root (same as --data-dir)")
    p.add_argument("--data-dir", default=None, help="dataset root holding <split>/<class>/*.jpg")
    p.add_argument("--split", default=split,
                   help=f"split folder under the root (default: {split}, like train.py's --val-split; 'val', "
                        "'valid', 'eval' are found too, and a root that holds the class folders is used as it is), "
                        "or a split of tar shards (a name in _info.json or NAME-validation-{00..63}.tar)")
    p.add_argument("--dataset", default="", metavar="TYPE/NAME",
                   help="'wds/NAME': WebDataset tar shards + _info.json in --data-dir (found without it too); "
                        "default: image folder")
    p.add_argument("--model", "-m", default=None,
                   help=f"model name (naflex.list_models()), optionally NAME.TAG or hf-hub:timm/NAME.TAG (default: the "
                        f"name the checkpoint stores, else {DEFAULT_MODEL}); as timm, 'all', a wildcard pattern, a "
                        "comma list or a file of names validates each with its published weights")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="model config fields (default: those the checkpoint records), e.g. embed_dim=192 depth=6")
    p.add_argument("--checkpoint", default="",
                   help="our checkpoint (plain/EMA/training state) or a timm .pth/.safetensors, or a folder: each "
                        "*.pth / *.pth.tar in it (default: the model's published weights, as timm)")
    p.add_argument("--pretrained", action="store_true",
                   help="the model's published weights (Hugging Face Hub, cached; HF_HUB_OFFLINE=1 reads the cache "
                        "only); the default without --checkpoint, as in timm")
    p.add_argument("--class-map", default="", metavar="FILE",
                   help="class names in index order (timm's .txt / .pkl; default: the names the checkpoint records, "
                        "else timm's folder order)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights ('state_dict_ema') of a checkpoint")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the checkpoint's, else the dataset's)")
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
    p.add_argument("--amp-dtype", default=amp_dtype, choices=AMP_DTYPES,
                   help=f"autocast dtype (default: {amp_dtype}, as in train.py and timm; the model card uses bfloat16)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--attn-backend", default="auto", choices=ATTN_BACKENDS,
                   help="attention backend for packed batches (default: auto)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile the model")
    p.add_argument("--torchcompile-mode", default=None, help="torch.compile mode")
    p.add_argument("--model-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights and inputs in this dtype (as timm; float32 with --amp)")
    p.add_argument("--gp", default=None, help="global pool type of the model (default: the model's)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="normalization mean (default: the model's)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="normalization std (default: the model's)")
    p.add_argument("--interpolation", default="", choices=("", "bilinear", "bicubic", "nearest", "lanczos", "box",
                                                           "hamming"),
                   help="resize interpolation (default: the model's)")
    p.add_argument("--pin-mem", action="store_true", help="pin host batches (always on with CUDA here)")
    p.add_argument("--retry", action="store_true", help="on out-of-memory, retry with half the batch size (as timm)")
    p.add_argument("--seed", type=int, default=42, help="random seed (evaluation draws nothing at random)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format of 4-D weights (NaFlexViT has none: no effect)")
    p.add_argument("--reparam", action="store_true", help="re-parameterize the model (timm's; none in NaFlexViT)")
    p.add_argument("--results-file", default="", help="write results to .csv or .json (by extension)")
    p.add_argument("--results-format", default=None, choices=("csv", "json"), help="override the file format")
    p.add_argument("--plot", default="", help="PNG of top-1 vs sequence length (default: next to --results-file)")
    p.add_argument("--log-freq", type=int, default=0, help="print progress every N batches (default: off)")
    refuse(p, VALIDATE_REFUSED)  # timm's flags that do not apply: one line each, with the reason
    return p


_FLAGS = {"max_seq_len": "--naflex-max-seq-len", "batch_size": "-b/--batch-size", "num_workers": "-j/--workers",
          "name": "--model", "num_classes": "--num-classes", "attn_backend": "--attn-backend", "device": "--device",
          "amp": "--amp", "amp_dtype": "--amp-dtype", "packing": "--padded", "torchcompile": "--torchcompile",
          "torchcompile_mode": "--torchcompile-mode", "global_pool": "--gp", "std": "--std", "kwargs": "--model-kwargs"}


def check_args(args) -> None:
    """Every flag value, with train.py's rules (the config dataclasses' ``validate``), before anything is read."""
    from loaders.config import EvalLoaderConfig
    from naflex.model import DEFAULT_MODEL
    from naflex.train.config import ModelConfig, TrainConfig

    parts = [EvalLoaderConfig(max_seq_len=L, batch_size=args.batch_size, num_workers=args.workers)
             for L in args.naflex_max_seq_len]
    parts.append(TrainConfig(device=args.device or "cpu", amp=args.amp, amp_dtype=args.amp_dtype))
    parts.append(ModelConfig(name=args.model or DEFAULT_MODEL, num_classes=args.num_classes, kwargs=args.model_kwargs,
                             attn_backend=args.attn_backend, torchcompile=args.torchcompile,
                             torchcompile_mode=args.torchcompile_mode, global_pool=args.gp,
                             std=tuple(args.std) if args.std else None))
    problems = []
    for part in parts:
        try:
            part.validate(lambda field: _FLAGS.get(field, field))
        except ValueError as e:
            problems.append(str(e))
    if args.log_freq < 0:
        problems.append("--log-freq must be >= 0")
    if args.model_dtype not in (None, "float32") and args.amp:
        problems.append(f"--model-dtype {args.model_dtype} with --amp: autocast runs float32 weights (as timm)")
    if not (args.data_dir or args.data):
        problems.append("no dataset given: pass --data-dir DIR")
    for flag, path in (("--results-file", args.results_file), ("--plot", args.plot)):
        problems += [f"{flag} {path}: {why}" for why in [_cannot_write(path)] if path and why]
    if problems:
        raise ValidateError("; ".join(dict.fromkeys(problems)))  # one sequence length's problem once


def _cannot_write(path: str) -> str:
    """Why ``path`` cannot be written (checked up front: the results come after the whole evaluation), or ''."""
    target = Path(path)
    if target.is_dir():
        return "is a folder"
    folder = next((p for p in target.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be created: {folder} is not a writable folder"
    return ""


def _check_attention(args, model: str, device: str) -> None:
    """The attention backend fits the device, precision, layout and batch size (train.py's rule)."""
    import naflex
    from naflex.train.config import attention_problems

    problems = attention_problems(
        args.attn_backend, device=device, amp=args.amp, packing=not args.padded, compiled=bool(args.torchcompile),
        training=False, tokens_per_step=args.batch_size * max(args.naflex_max_seq_len),
        num_heads=naflex.get_config(model).num_heads, flag=_FLAGS.get)
    if problems:
        raise ValidateError("; ".join(problems))


_SPLIT_NAMES = ("train", "training", "val", "validation", "valid", "eval", "evaluation", "test")


def _open_dataset(args, classes=None):
    """The split as an image folder or as tar shards (``--dataset wds/NAME``, or shards found in the root:
    loaders.shards), its class indices those of ``classes`` when given (a class map), else timm's order."""
    from loaders import ImageFolderDataset, IncompleteSplit, open_dataset, require_whole
    from loaders.shards import dataset_kind, is_shard_source

    root = args.data_dir or args.data
    if not Path(root).is_dir():
        raise ValidateError(f"dataset folder not found: {root}")
    if dataset_kind(args.dataset) not in ("", "wds"):
        raise ValidateError(f"--dataset {args.dataset}: only wds/NAME (tar shards) and image folders are read")
    try:
        ds = open_dataset(root, args.split, classes=classes, dataset=args.dataset)
    except (FileNotFoundError, ValueError) as e:
        if is_shard_source(root, args.split, args.dataset):
            raise ValidateError(str(e)) from None
        if not isinstance(e, FileNotFoundError):
            raise ValidateError(str(e)) from None  # a split file that lists nothing, or files that are not there
        splits = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and d.name.lower() in _SPLIT_NAMES)
        if splits or args.split.endswith(".txt"):  # the root holds splits, just not this one
            raise ValidateError(f"{e}" + (f" (it holds {', '.join(splits)}: pass --split NAME)" if splits else "")) \
                from None
        # Like timm's folder datasets: a root that directly holds class folders is used as it is.
        try:
            ds = ImageFolderDataset(root, "", classes=classes)
        except (FileNotFoundError, OSError) as e:
            raise ValidateError(f"split '{args.split}' not found under {root}: {e}") from None
    if len(ds) == 0 or not ds.classes:
        raise ValidateError(f"no images found in {ds.base} (expected <class>/<image> folders)")
    try:
        require_whole(ds)
    except IncompleteSplit as e:
        raise ValidateError(str(e)) from None
    return ds


def _dataset_for(args, weights: "Weights"):
    """The dataset, its classes in the order the weights were trained with: --class-map's; else the names a
    checkpoint of ours records (class folders it does not know are an error); else, for a checkpoint of ours
    written before names were recorded, sorted() order; else timm's order (timm's checkpoints, published weights)."""
    from loaders import read_class_map
    from naflex.train.checkpoint import sorted_order_of

    root = args.data_dir or args.data
    if args.class_map:
        try:
            return _open_dataset(args, read_class_map(args.class_map, root))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ValidateError(f"--class-map: {e}") from None
    ds = _open_dataset(args, weights.classes)
    if weights.classes is not None:
        if ds.skipped_classes:
            raise ValidateError(
                f"{len(ds.skipped_classes)} class folders of the dataset are not among the {len(weights.classes)} "
                f"classes {weights.source} was trained on: {', '.join(ds.skipped_classes[:5])}; pass --class-map "
                "FILE to say which output each class is")
        print(f"classes: the {len(weights.classes)} names {weights.source} records, in its order")
    elif weights.sorted_order and sorted_order_of(ds):
        print(f"classes: {weights.source} was written before checkpoints recorded class names, with classes in "
              "sorted() order; that order is used")
        ds = _open_dataset(args, sorted_order_of(ds))
    return ds


@dataclass
class Weights:
    """What to evaluate: the state dict (None: random init), where it came from, the model name and kwargs, and the
    class names in index order it records (None: unknown) or whether its classes are in sorted() order."""
    state: dict | None
    source: str
    name: str
    kwargs: dict
    classes: list | None = None
    sorted_order: bool = False


def _read_checkpoint(path: str, use_ema: bool) -> tuple[dict, object]:
    """(state dict, the whole file's object) of any file naflex.model.weights reads (ours, timm's .pth /
    .safetensors); with --use-ema only the EMA copy ('state_dict_ema' / 'model_ema') is accepted, without it only
    the plain weights."""
    from naflex.model.weights import read_file, state_dict_from

    try:
        obj = read_file(path)
        return state_dict_from(obj, use_ema=use_ema, require_ema=use_ema, path=path), obj
    except (FileNotFoundError, ValueError) as e:
        raise ValidateError(str(e)) from None


def _read_published(name: str) -> tuple[dict, str]:
    """(state dict, 'hf-hub:<repo>') of the weights published for ``name``; a model without any is an error."""
    import naflex
    from naflex.model.registry import hub_id
    from naflex.model.weights import read_hub_state_dict

    try:
        repo = hub_id(name)
    except ValueError as e:
        raise ValidateError(f"{e}: pass --checkpoint FILE") from None
    try:
        return read_hub_state_dict(repo), f"hf-hub:{repo}"
    except naflex.HubUnavailable as e:
        raise ValidateError(f"{name}'s published weights: {e}; pass --checkpoint FILE (its model.safetensors), or "
                            "fill the cache on a machine with network and run with HF_HUB_OFFLINE=1") from None
    except ValueError as e:
        raise ValidateError(f"{name}'s published weights: {e}") from None


def _weights(args) -> Weights:
    """The weights to score, as timm's validate.py picks them: --checkpoint's file, else the model's published
    weights (``--pretrained``, the default without --checkpoint; ``run`` reads them once every other input is
    checked). A training checkpoint supplies the architecture, the --model-kwargs and the class
    names it records; flags given here win."""
    from naflex.model import DEFAULT_MODEL
    from naflex.train.checkpoint import recorded_classes, recorded_model, sorted_class_order
    from naflex.train.cli import format_kwargs

    if not args.checkpoint:  # read once every other input is checked (load_published)
        name = args.model or DEFAULT_MODEL
        return Weights(None, "", name, dict(args.model_kwargs))
    path = args.checkpoint
    if not Path(path).is_file():
        raise ValidateError(f"checkpoint file not found: {path}")
    if args.pretrained:
        print("note: --checkpoint replaces the published weights --pretrained names (as in timm)")
    state, obj = _read_checkpoint(path, args.use_ema)
    arch, kwargs = recorded_model(obj)
    if kwargs:
        print(f"model kwargs recorded in the checkpoint: {format_kwargs(kwargs)}")
    name = args.model or arch or DEFAULT_MODEL
    if not args.model:
        print(f"note: model {name} ({f'the name stored in {path}' if arch else 'the default'}; "
              "pass --model to choose another)")
        if arch:
            import naflex
            try:
                naflex.get_config(arch)
            except ValueError as e:
                raise ValidateError(f"{e} (the name stored in {path}); pass --model NAME") from None
    return Weights(state, path, name, {**kwargs, **args.model_kwargs}, recorded_classes(obj), sorted_class_order(obj))


def _create_model(args, weights: Weights, num_dataset_classes: int, names_known: bool = True):
    """The model with ``weights`` loaded strictly; one-line errors for every mismatch. ``names_known`` False (tar
    shards that only give class indices): a head larger than the dataset is fine."""
    import naflex

    state, source, name, kwargs = weights.state, weights.source, weights.name, weights.kwargs
    num_classes = args.num_classes
    head = state.get("head.weight") if state else None
    if head is not None:
        if num_classes is not None and num_classes != head.shape[0]:
            raise ValidateError(f"class-count mismatch: --num-classes {num_classes} but {source} has a "
                                f"{head.shape[0]}-class head")
        num_classes = head.shape[0]
    if num_classes is None:
        num_classes = num_dataset_classes if not source else None
    try:
        model = naflex.create_model(name, **kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
    except ValueError as e:
        raise ValidateError(str(e).splitlines()[0]) from None
    try:
        naflex.load_into(model, state, source=source)
    except naflex.WeightsMismatch as e:
        raise ValidateError(str(e)) from None
    # shards whose classes are bare indices may lack the last classes of the label space
    if model.num_classes < num_dataset_classes or (model.num_classes != num_dataset_classes and names_known):
        raise ValidateError(
            f"class-count mismatch: the dataset has {num_dataset_classes} classes but the model has "
            f"{model.num_classes} outputs" + ("" if source else f" (pass --num-classes {num_dataset_classes})"))
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


def plot_results(rows: list[dict], path) -> Path:
    """PNG of top-1 against sequence length (the NaFlex picture: one model, any sequence length)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["seq_len"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["seq_len"] for r in rows], [r["top1"] for r in rows], marker="o")
    ax.set_xlabel("sequence length (patches)")
    ax.set_ylabel("top-1 (%)")
    ckpt = Path(rows[0]["checkpoint"]).name if rows[0].get("checkpoint") else "random init"
    ax.set_title(f"{rows[0]['model']} ({ckpt}{', EMA' if rows[0].get('ema') else ''})", fontsize=10)
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
    from loaders import DevicePrefetcher, make_eval_loader
    from naflex.train.distributed import init_distributed
    from naflex.train.evaluate import evaluate

    check_args(args)
    torch.manual_seed(args.seed)
    if args.model:
        try:
            naflex.get_config(args.model)  # unknown name: registry's message, before any checkpoint is read
        except ValueError as e:
            raise ValidateError(str(e)) from None
    weights = _weights(args)
    if args.gp:
        weights.kwargs["global_pool"] = args.gp
    name, checkpoint = weights.name, weights.source
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_attention(args, name, device)
    dataset = _dataset_for(args, weights)
    if weights.state is None:
        weights.state, weights.source = _read_published(name)
        checkpoint = weights.source
    model = _create_model(args, weights, len(dataset.classes), getattr(dataset, 'class_names_known', True))
    del weights
    try:
        dist_info = init_distributed(device)
    except RuntimeError as e:  # DeviceError (e.g. --device cuda without a GPU), process-group setup
        raise ValidateError(str(e)) from None
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.reparam:
        from timm.utils import reparameterize_model
        model = reparameterize_model(model)
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else torch.float32
    model = model.to(device, model_dtype).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # timm's meaning: 4-D weights only (NaFlexViT has none)
    patch_size = model.patch_size
    packing = not args.padded
    if packing and hasattr(model, "set_attn_backend"):
        model.set_attn_backend(args.attn_backend)
    norm = naflex.data_config(model)
    norm = dict(norm, mean=args.mean or norm["mean"], std=args.std or norm["std"],
                interpolation=args.interpolation or norm["interpolation"])
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode, dynamic=True)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None

    def evaluate_at(seq_len: int, batch_size: int) -> dict:
        loader = make_eval_loader(
            dataset, max_seq_len=seq_len, batch_size=batch_size, patch_size=patch_size,
            num_workers=args.workers, rank=rank, world_size=world_size, packing=packing,
            interpolation=norm["interpolation"], exif_orientation=args.exif_orientation,
            pin_memory=args.pin_mem or device.type == "cuda")
        batches = DevicePrefetcher(loader, device, norm["mean"], norm["std"], dtype=model_dtype)
        return evaluate(model, batches, device, amp_dtype=amp_dtype, world_size=world_size,
                        log_interval=args.log_freq)

    rows = []
    for seq_len in dict.fromkeys(args.naflex_max_seq_len):  # a length given twice is scored once
        m = _with_retry(evaluate_at, seq_len, args.batch_size, args.retry)
        for path in m["bad_file_paths"]:
            print(f"bad image file (skipped): {path}", file=sys.stderr)
        row = {
            "model": name, "checkpoint": checkpoint, "ema": bool(args.use_ema), "seq_len": seq_len,
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
    return rows


def _with_retry(evaluate_at, seq_len: int, batch_size: int, retry: bool) -> dict:
    """``evaluate_at(seq_len, batch_size)``; with --retry, out of device memory halves the batch and tries again
    (timm's --retry), down to one image."""
    import torch

    while True:
        try:
            return evaluate_at(seq_len, batch_size)
        except torch.OutOfMemoryError:
            if not retry or batch_size == 1:
                raise ValidateError(f"out of device memory at sequence length {seq_len} with -b {batch_size}: lower "
                                    "-b" + ("" if retry else " (or pass --retry)")) from None
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            print(f"out of device memory at sequence length {seq_len}: retrying with -b {batch_size}")


def bulk_runs(args) -> list[tuple[str, str]]:
    """The (model, checkpoint) pairs of a bulk validation, as timm's validate.py finds them: every ``*.pth.tar`` /
    ``*.pth`` of a --checkpoint folder (natural order) with --model; or --model 'all', a wildcard pattern
    (``'naflexvit_base*'``), a comma-separated list or a text file of names, each with its published weights.
    [] for a single run."""
    import naflex
    from loaders.dataset import natural_key

    if args.checkpoint and Path(args.checkpoint).is_dir():
        found = sorted({*Path(args.checkpoint).glob("*.pth.tar"), *Path(args.checkpoint).glob("*.pth")},
                       key=lambda p: natural_key(p.name))
        if not found:
            raise ValidateError(f"--checkpoint {args.checkpoint}: a folder with no *.pth / *.pth.tar file")
        return [(args.model, str(path)) for path in found]
    model = args.model or ""
    if model == "all":
        names = naflex.list_models(pretrained=True)
    elif "," in model:
        names = [n.strip() for n in model.split(",") if n.strip()]
    elif any(c in model for c in "*?["):
        names = naflex.list_models(model, pretrained=True)
        if not names:
            raise ValidateError(f"--model {model}: no model with published weights matches")
    elif Path(model).is_file():
        names = [ln.strip() for ln in Path(model).read_text().splitlines() if ln.strip()]
    else:
        return []
    return [(name, "") for name in names]


def report(args, rows: list[dict], sweep: bool) -> None:
    """The results file and, for one model at several sequence lengths, the plot of top-1 against length."""
    if args.results_file:
        print(f"results written to {write_results(rows, args.results_file, args.results_format)}")
    if sweep and len(rows) > 1:
        plot_path = args.plot or (str(Path(args.results_file).with_suffix(".png")) if args.results_file else "")
        if plot_path:
            print(f"plot written to {plot_results(rows, plot_path)}")
        else:
            print("pass --plot FILE.png or --results-file to save a top-1 vs sequence length plot")


def _primary() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; 0 without torchrun


def run_all(args) -> list[dict]:
    """One run, or every run of a bulk validation (``bulk_runs``): one results file, rows by top-1 as timm sorts
    them. A run that fails is one error line and the others go on; all failing is the last one's error."""
    runs = bulk_runs(args)
    if not runs:
        rows = run(args)
        if _primary():
            report(args, rows, sweep=True)
        return rows
    print(f"bulk validation of {len(runs)} runs: " + ", ".join(c or m for m, c in runs))
    rows, failed = [], []
    for model, checkpoint in runs:
        try:
            rows += run(argparse.Namespace(**{**vars(args), "model": model, "checkpoint": checkpoint}))
        except ValidateError as e:
            print(f"validate.py: error ({checkpoint or model}): {e}", file=sys.stderr)
            failed.append(e)
    if not rows:
        raise failed[-1]
    rows.sort(key=lambda r: r["top1"], reverse=True)
    if _primary():
        report(args, rows, sweep=False)
    return rows


def main(argv=None) -> list[dict]:
    from naflex.train.evaluate import NoImagesEvaluated

    try:
        return run_all(build_parser().parse_args(argv))
    except ValidateError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NoImagesEvaluated as e:  # every file undecodable: there are no metrics to report
        print(f"validate.py: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from naflex.train.distributed import cleanup
            cleanup()


if __name__ == "__main__":
    main()
