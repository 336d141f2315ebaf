"""Builds a training run's parts from its ``Config``: datasets, model, loaders, optimizer and friends, the run
folder. train.py calls these in order; each turns the mistakes a user can make into one-line ``UserError``s.
NaFlex: SigLIP 2 (arXiv:2502.14786); packed sequences: NaViT (arXiv:2307.06304).
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

import loaders
import naflex
from loaders.shards import classes_compatible
from loaders.stream import StreamSource, wants_stream
from loaders.stream_io import DataSourceError

from .checkpoint import load_published_weights, load_weights, recorded_model
from .cli import format_kwargs
from .config import Config
from .distributed import DistInfo, broadcast_object, primary_first

_logger = logging.getLogger('train')


class UserError(Exception):
    """A problem the user can fix; reported as one line without a traceback."""


def _open_split(cfg: Config, split: str, what: str, hint: str = '', classes=None):
    """The dataset of one split (image folder or tar shards); a missing split or one without a single image is a
    UserError."""
    data = cfg.data
    root = (data.root if wants_stream(data.root) else Path(data.root)) if data.root else None  # None: hf, no cache
    try:
        ds = loaders.open_dataset(root, split, classes=classes, cache_dir=data.cache_dir, dataset=data.dataset,
                                  input_key=data.input_key, target_key=data.target_key,
                                  num_classes=cfg.model.num_classes)
    except (FileNotFoundError, ValueError, DataSourceError) as e:
        raise UserError(f'no {what} images: {e}{hint}') from None
    if getattr(ds, 'skipped_classes', None):
        names = ds.skipped_classes
        _logger.warning(f'split {split!r}: {len(names)} class folders are not in the class map and are left out: '
                        f'{_shown(names)}')
    if len(ds) == 0:
        raise UserError(f'--data-dir {root}: split {split!r} holds no images ({len(ds.classes)} class folders, '
                        f'all empty){hint}')
    return ds


def _warn_empty_classes(train_ds, val_ds, data) -> None:
    """Class folders with no training image get a classifier output the model can never learn."""
    if not getattr(train_ds, 'class_names_known', True) or getattr(train_ds, 'targets', None) is None:
        return  # shards that only give class indices (an index no sample has is not a folder left empty), or
                # streamed ones (their labels are known only once read)
    counts = np.bincount(train_ds.targets, minlength=len(train_ds.classes))
    empty = [c for c, n in zip(train_ds.classes, counts) if n == 0]
    if not empty:
        return
    shown = ', '.join(empty[:10]) + (f' (+{len(empty) - 10} more)' if len(empty) > 10 else '')
    also = ''
    if val_ds is not None:
        val_counts = np.bincount(val_ds.targets, minlength=len(val_ds.classes))
        num_val = int(sum(val_counts[val_ds.class_to_idx[c]] for c in empty))
        also = f' (the model cannot learn them: their {num_val} images in {data.val_split!r} count as errors)' \
            if num_val else ''
    _logger.warning(f'{len(empty)} of {len(train_ds.classes)} class folders in split {data.train_split!r} hold no '
                    f'images: {shown}{also}')


def class_map_for(cfg: Config, resume_ckpt: Optional[dict] = None) -> Optional[List[str]]:
    """The class names, in index order, a run trains: --class-map's, else those the resumed checkpoint records,
    else None (timm's folder order). A --class-map that disagrees with the resumed run's classes is a UserError."""
    from .checkpoint import recorded_classes
    recorded = recorded_classes(resume_ckpt) if resume_ckpt is not None else None
    if not cfg.data.class_map:
        return recorded
    try:
        classes = loaders.read_class_map(cfg.data.class_map, cfg.data.root)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f'--class-map: {e}') from None
    if recorded is not None and recorded != classes:
        raise UserError(f'--class-map {cfg.data.class_map} orders the classes differently from the run being resumed '
                        f'(it records {len(recorded)} classes: {", ".join(recorded[:3])}, ...); drop --class-map')
    return classes


def _shown(names: List[str]) -> str:
    return ', '.join(names[:5]) + (f' (+{len(names) - 5} more)' if len(names) > 5 else '')


def _classes_differ(cfg: Config, train_ds, val_ds) -> str:
    """The one line for splits whose class folders differ (a label index would not name the same class in both),
    with the ways out: make the folders agree, fix the label space with --class-map, or train without evaluation."""
    data = cfg.data
    train_classes, val_classes = set(train_ds.classes), set(val_ds.classes)
    only_t = [c for c in train_ds.classes if c not in val_classes]
    only_v = [c for c in val_ds.classes if c not in train_classes]
    what = []
    if only_t:
        what.append(f'lacks {len(only_t)} training class{"es" * (len(only_t) > 1)} ({_shown(only_t)})')
    if only_v:
        what.append(f'holds {len(only_v)} folder{"s" * (len(only_v) > 1)} of no training class ({_shown(only_v)})')
    fix = {(True, True): 'add the missing folders (empty ones will do) and remove the others',
           (True, False): 'add the missing folders (empty ones will do)', (False, True): 'remove those folders',
           (False, False): 'give both splits the same classes'}[bool(only_t), bool(only_v)]
    train_dir, val_dir = getattr(train_ds, 'base', None), getattr(val_ds, 'base', None) or data.val_split
    example = f' (`ls {train_dir} > classes.txt`)' if train_dir is not None and Path(train_dir).is_dir() else ''
    return (f'class folders differ between {data.train_split!r} and {data.val_split!r}, so their labels would not '
            f'match: {val_dir} {" and ".join(what) or "orders the classes differently"}; {fix}, or pass --class-map '
            f'FILE naming the training classes one a line{example}, or --val-split "" to train without evaluation')


def open_datasets(cfg: Config, resume_ckpt: Optional[dict] = None):
    """(train dataset, val dataset or None), checked: both exist, hold images and the same classes. Image folders
    or tar shards (``--dataset wds/NAME``, or shards found in ``--data-dir``) or a Hugging Face dataset
    (``--dataset hfds/NAME``); rank 0 opens them first, so an index
    it builds and caches is read, not rebuilt, by the other ranks. Class indices: ``class_map_for``; a resumed
    checkpoint written before checkpoints recorded class names had them in ``sorted()`` order, which is kept."""
    from .checkpoint import sorted_class_order, sorted_order_of
    root, data = Path(cfg.data.root), cfg.data
    hub = loaders.dataset_kind(data.dataset) in ('hfds', 'hfids')
    if not wants_stream(data.root) and not root.is_dir() and not (hub and not data.root):
        raise UserError(f'--data-dir {root} does not exist')
    classes = class_map_for(cfg, resume_ckpt)
    with primary_first():  # rank 0 builds (and caches) a shard index first; the others then read it
        train_ds = _open_split(cfg, data.train_split, 'training', classes=classes)
        legacy = sorted_order_of(train_ds) if classes is None and sorted_class_order(resume_ckpt) else None
        if legacy:
            classes = legacy
            _logger.info('--resume: the checkpoint records no class names (written before they were recorded, with '
                         'classes in sorted() order): that order is kept')
            train_ds = _open_split(cfg, data.train_split, 'training', classes=classes)
        val_ds = None
        if data.val_split:
            val_ds = _open_split(cfg, data.val_split, 'validation',
                                 ' (pass --val-split "" to train without evaluation)', classes=classes)
    if val_ds is not None:
        try:
            loaders.require_whole(val_ds)
        except loaders.IncompleteSplit as e:
            raise UserError(f'{e} (pass --val-split "" to train without evaluation)') from None
    if val_ds is not None and not classes_compatible(train_ds, val_ds):
        raise UserError(_classes_differ(cfg, train_ds, val_ds))
    _warn_empty_classes(train_ds, val_ds, data)
    return train_ds, val_ds


def num_classes_for(cfg: Config, train_ds) -> int:
    num_classes = cfg.model.num_classes or len(train_ds.classes)
    if num_classes < len(train_ds.classes):
        raise UserError(f'--num-classes {num_classes} is below the {len(train_ds.classes)} class folders in '
                        f'{cfg.data.root}/{cfg.data.train_split}')
    if cfg.model.num_classes is None:
        _logger.info(f'--num-classes {num_classes}: the classes found (timm\'s train.py defaults to the model\'s own '
                     'class count, 1000 for the published models)')
    return num_classes


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The model with its start weights, as timm's train.py picks them: --initial-checkpoint (the EMA copy when
    the file has one, loaded last: it replaces --pretrained's); else --pretrained, from --pretrained-path's file
    (a local copy of the published weights, classifier always re-initialized as timm's overlay does) or the Hub.
    Ours differs in one way, logged: a classifier of another size is re-initialized where timm would stop."""
    m = cfg.model
    try:
        model = naflex.create_model(m.name, **m.overrides(num_classes))
    except (TypeError, ValueError) as e:  # an unknown keyword is timm's TypeError
        raise UserError(str(e)) from None
    if m.initial_checkpoint:
        if m.pretrained:
            _logger.info('--initial-checkpoint replaces the --pretrained weights (as in timm: it is loaded last)')
        _load_file(model, m.initial_checkpoint, '--initial-checkpoint')
    elif m.pretrained and m.pretrained_path:
        _load_file(model, m.pretrained_path, '--pretrained-path', fresh_head=True)
    elif m.pretrained:
        _load_published(model, m.name)
    _init_head(model, m.head_init_scale, m.head_init_bias)
    if m.dtype not in (None, 'float32'):
        model.to(dtype=getattr(torch, m.dtype))
        _logger.info(f'--model-dtype {m.dtype}: weights, gradients and optimizer state in {m.dtype}, no autocast'
                     + (' (timm advises bfloat16 over float16 for training)' if m.dtype == 'float16' else ''))
    if m.channels_last:
        _logger.info('--channels-last: no effect here: the model holds no 4-D tensor (patches are embedded by a '
                     'linear layer)')
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.set_attn_backend(m.attn_backend)
    if cfg.loader.patch_sizes and m.torchcompile:
        model.prewarm_patch_sizes(cfg.loader.patch_sizes)  # resampling matrices built outside the graph
    return model


def _init_head(model: torch.nn.Module, scale: Optional[float], bias: Optional[float]) -> None:
    """timm's --head-init-scale (classifier weight and bias times ``scale``) and --head-init-bias (the bias set to
    ``bias``), applied to the start weights, whichever flag loaded them."""
    head = model.get_classifier()
    if (scale is not None or bias is not None) and not isinstance(head, torch.nn.Linear):
        raise UserError('--head-init-scale/--head-init-bias: the model has no classifier (--num-classes 0)')
    with torch.no_grad():
        if scale is not None:
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        if bias is not None:
            head.bias.fill_(bias)


def _load_file(model: torch.nn.Module, path: str, flag: str, fresh_head: bool = False) -> None:
    """Weights from ``path`` (the EMA copy when it has one, as timm reads it); ``fresh_head``: the classifier keeps
    its fresh initialization whatever its size (timm's --pretrained-path overlay, num_classes=-1)."""
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('head.')} if fresh_head else {}
    try:
        copy, skipped = load_weights(model, path, use_ema=True)
    except (FileNotFoundError, ValueError) as e:  # WeightsMismatch is a ValueError
        raise UserError(str(e)) from None
    if head:
        model.load_state_dict(head, strict=False)
        note = '; the classifier starts fresh (timm\'s --pretrained-path overlay re-initializes it)'
    elif skipped:
        note = (f'; its classifier has another class count, so a fresh one for {model.num_classes} classes is used '
                '(timm\'s train.py stops there: it loads the file strictly)')
    else:
        note = ''
    _logger.info(f'{flag}: loaded the {"EMA weights" if copy == "ema" else "weights"} of {path}{note}')


def _load_published(model: torch.nn.Module, name: str) -> None:
    try:
        source = load_published_weights(model, name)
    except naflex.HubUnavailable as e:
        raise UserError(f'--pretrained: {e}; pass --pretrained-path FILE (its model.safetensors), or fill the cache '
                        'on a machine with network and run with HF_HUB_OFFLINE=1') from None
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f'--pretrained: {e}') from None
    _logger.info(f'loaded weights from {source}')


def with_recorded_model(cfg: Config, ckpt: Optional[dict]) -> Config:
    """``--resume``: the model is built as the checkpoint records it (its --model-kwargs), so the flags need not
    repeat them; other --model-kwargs on the command line are an error (the weights would not fit)."""
    if ckpt is None:
        return cfg
    _, kwargs = recorded_model(ckpt)
    if cfg.model.kwargs and cfg.model.kwargs != kwargs:
        raise UserError(f'--model-kwargs {format_kwargs(cfg.model.kwargs)} differ from the checkpoint\'s '
                        f'({format_kwargs(kwargs) or "none"}): drop them to resume')
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs=kwargs))


def check_step_memory(cfg: Config, dist: DistInfo) -> None:
    """A training or evaluation step too large for the device's memory is a UserError (naflex.train.memory says how
    that is decided); ``cfg`` holds the model as it will be built (``with_recorded_model``)."""
    from .memory import describe, device_memory, step_memory_problem
    problem = step_memory_problem(cfg, device_memory(dist.device), describe(dist.device))
    if problem:
        raise UserError(problem)


def start_wandb(cfg: Config, out_dir: Path, config: dict):
    """``--log-wandb``: a Weights & Biases run named after the run folder, its files in ``out_dir/wandb``
    (call on the primary rank only). A failing ``wandb.init`` (not logged in, no network) is one UserError."""
    if not cfg.run.log_wandb:
        return None
    import wandb
    try:
        resume_id = cfg.run.wandb_resume_id or None
        return wandb.init(project=cfg.run.wandb_project, name=out_dir.name, config=config, dir=str(out_dir),
                          tags=list(cfg.run.wandb_tags), id=resume_id, resume='must' if resume_id else None)
    except Exception as e:  # wandb raises its own error types, e.g. a missing API key
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'--log-wandb: wandb.init failed: {first} (run `wandb login`, or set WANDB_MODE=offline)') \
            from None


def resolve_data_config(cfg: Config, model: torch.nn.Module) -> Config:
    """The configs with the model's patch size, normalization and eval interpolation filled in (--mean, --std,
    --interpolation override the model's; with --no-aug training resizes with the eval interpolation, as timm)."""
    norm = naflex.data_config(model)
    mean, std = tuple(cfg.model.mean or norm['mean']), tuple(cfg.model.std or norm['std'])
    interpolation = cfg.model.interpolation or norm['interpolation']
    train_interpolation = interpolation if cfg.aug.no_aug else cfg.aug.interpolation
    return dataclasses.replace(
        cfg, aug=dataclasses.replace(cfg.aug, mean=mean, std=std, interpolation=train_interpolation),
        model=dataclasses.replace(cfg.model, mean=mean, std=std),
        loader=dataclasses.replace(cfg.loader, patch_size=model.patch_size),
        eval=dataclasses.replace(cfg.eval, patch_size=model.patch_size, interpolation=interpolation))


_DEFAULT_SHUFFLE_BUFFER = next(f.default for f in dataclasses.fields(loaders.TrainLoaderConfig)
                               if f.name == 'shuffle_buffer')


def build_loaders(cfg: Config, train_ds, val_ds, num_classes: int, dist: DistInfo) -> Tuple[object, Optional[object]]:
    """(train loader, eval loader or None) for this rank; host memory is pinned on CUDA."""
    pin = True if dist.device.type == 'cuda' else cfg.loader.pin_memory
    if cfg.loader.aug_repeats > 1:
        _logger.info(f'--aug-repeats {cfg.loader.aug_repeats}: each epoch keeps its length and shows every image it '
                     f'holds {cfg.loader.aug_repeats} times, each copy augmented apart and, with several ranks, on '
                     'another rank (timm\'s NaFlex loader refuses the flag)')
    if cfg.loader.num_samples:
        _logger.info(f'--train-num-samples {cfg.loader.num_samples}: epochs of {cfg.loader.num_samples} samples '
                     f'drawn from the {len(train_ds)} of {cfg.data.train_split!r} (timm applies the flag to streamed '
                     'datasets and tar shards only, as their epoch length)')
    if isinstance(train_ds, StreamSource):
        buffer = cfg.loader.shuffle_buffer
        _logger.info(f'streaming {len(train_ds)} samples in {len(train_ds.urls)} shards from {train_ds.root}: shard '
                     f'order from (seed, epoch), each rank and loader worker a contiguous share (every sample once per '
                     f'epoch), ' + (f'samples shuffled in windows of {buffer} (--wds-shuffle-buffer)' if buffer > 1
                                    else 'no sample shuffle (--wds-shuffle-buffer 0)'))
    elif cfg.loader.shuffle_buffer != _DEFAULT_SHUFFLE_BUFFER:
        _logger.info(f'--wds-shuffle-buffer {cfg.loader.shuffle_buffer} has no effect: it is the sample shuffle of '
                     'streamed data (tar shards from a URL, bucket or file:// --data-dir; --dataset hfids/), and this '
                     'training set is read by random access, in a fresh order of all its samples every epoch')
    if cfg.aug.device_aug:
        _logger.info(f'--device-aug: the workers read files and draw the augmentation, {dist.device} decodes and '
                     'augments each step; a JPEG crop downscaled >= 2x is decoded in full and reduced by 2x2 means '
                     'instead of the CPU path\'s reduced-DCT decode: its pixels differ by a few grey levels')
    try:
        train = loaders.create_train_loader(
            train_ds, cfg=dataclasses.replace(cfg.loader, pin_memory=pin), aug=cfg.aug, mixup=cfg.mixup,
            num_classes=num_classes, rank=dist.rank, world_size=dist.world_size)
    except ValueError as e:  # what the data cannot do with these flags (e.g. --aug-repeats on streamed shards)
        raise UserError(str(e)) from None
    val = None
    if val_ds is not None:
        val = loaders.make_eval_loader(val_ds, dataclasses.replace(cfg.eval, pin_memory=pin), rank=dist.rank,
                                       world_size=dist.world_size)
    return train, val


def _holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a training run: its args.yaml, summary.csv or any checkpoint."""
    return folder.is_dir() and (any((folder / n).exists() for n in ('args.yaml', 'summary.csv'))
                                or any(folder.glob('*.pth')))


def _continues(resume: str, folder: Path) -> bool:
    """``--resume`` continues the run in ``folder``: 'auto', or a checkpoint file inside it."""
    return resume == 'auto' or (bool(resume) and Path(resume).resolve().parent == folder.resolve())


def _pick_run_dir(cfg: Config) -> Tuple[Path, Optional[str]]:
    root = Path(cfg.run.output)
    if not cfg.run.experiment:  # a generated name: a clash gets timm's -1, -2, ... suffix
        base = f'{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.name}'
        out, n = root / base, 0
        while _holds_run(out):
            n += 1
            out = root / f'{base}-{n}'
        return out, None
    out = root / cfg.run.experiment
    if _holds_run(out) and not _continues(cfg.run.resume, out):
        return out, (f'--experiment {cfg.run.experiment}: {out} already holds a run; pass --resume auto to '
                     'continue it, or another --experiment to start a new one')
    return out, None


def run_dir(cfg: Config, dist: DistInfo) -> Path:
    """The run folder's path, checked but not created (``create_run_dir`` does that once every input is checked).

    A folder that already holds a run is never overwritten: it is reused only to continue that run
    (``--resume auto`` or a checkpoint inside it); otherwise this is a one-line UserError on every rank.
    """
    path, problem = _pick_run_dir(cfg) if dist.is_primary else (None, None)
    path, problem = broadcast_object((str(path) if path is not None else None, problem))
    if problem:
        raise UserError(problem)
    return Path(path)


def create_run_dir(path: Path, cfg: Config, dist: DistInfo) -> Path:
    """Create the run folder (rank 0; the others only write through rank 0) and check that it is writable, so a
    read-only mount fails here in one line, not at the first save; every rank gets the same error."""
    problem = None
    if dist.is_primary:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            problem = f'--output {cfg.run.output}: cannot write the run folder {path}: {e.strerror or e}'
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return path


__all__ = ['UserError', 'build_loaders', 'build_model', 'check_step_memory', 'create_run_dir', 'num_classes_for',
           'open_datasets', 'resolve_data_config', 'run_dir', 'start_wandb', 'with_recorded_model']
