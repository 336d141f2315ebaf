"""What validate.py scores: the weights (a checkpoint file, EMA copy or not, or the published ones), the model they
were trained as (the recorded or named config), and the dataset with its classes in the weights' order
(``prepare`` puts them together on the device); ``bulk_runs``: the (model, checkpoint) pairs of a bulk
validation. Each mistake is one ``ValidateError`` line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .eval_cli import ValidateError


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


_SPLIT_NAMES = ("train", "training", "val", "validation", "valid", "eval", "evaluation", "test")


def _open_dataset(args, classes=None):
    """The split as an image folder or as tar shards (``--dataset wds/NAME``, or shards found in the root:
    loaders.shards), its class indices those of ``classes`` when given (a class map), else timm's order."""
    from loaders import ImageFolderDataset, IncompleteSplit, open_dataset, require_whole
    from loaders.config import DATASET_KINDS
    from loaders.shards import dataset_kind, is_shard_source
    from loaders.stream import wants_stream
    from loaders.stream_io import DataSourceError

    root = args.data_dir or args.data
    kind = dataset_kind(args.dataset)
    if kind not in DATASET_KINDS:
        raise ValidateError(f"--dataset {args.dataset}: only wds/NAME (tar shards), hfds/NAME or hfids/NAME (Hugging "
                            "Face datasets) and image folders are read")
    if kind in ("hfds", "hfids"):  # --data-dir: the datasets cache folder, if any
        try:
            return open_dataset(root, args.split, classes=classes, dataset=args.dataset, input_key=args.input_key,
                                target_key=args.target_key)
        except (FileNotFoundError, ValueError) as e:
            raise ValidateError(str(e)) from None
    if wants_stream(root):  # a URL, bucket or file:// folder of tar shards, read front to back
        try:
            ds = open_dataset(root, args.split, classes=classes, dataset=args.dataset, input_key=args.input_key,
                              target_key=args.target_key, num_classes=args.num_classes)
        except (FileNotFoundError, ValueError, DataSourceError) as e:
            raise ValidateError(str(e)) from None
        return ds
    if not Path(root).is_dir():
        raise ValidateError(f"dataset folder not found: {root}")
    try:
        ds = open_dataset(root, args.split, classes=classes, dataset=args.dataset, input_key=args.input_key,
                          target_key=args.target_key)
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


def dataset_for(args, weights: Weights):
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


def read_published(name: str) -> tuple[dict, str]:
    """(state dict, 'hf-hub:<repo>' or the file) of the weights ``name`` carries: published ones, or a
    ``local-dir:`` folder's; a model without any is an error."""
    import naflex
    from naflex.model.factory import parse_model_name, published_state_dict
    from naflex.model.registry import hub_id

    try:
        if parse_model_name(name)[0] != "local-dir":
            hub_id(name)
    except ValueError as e:
        raise ValidateError(f"{e}: pass --checkpoint FILE") from None
    try:
        return published_state_dict(name)
    except naflex.HubUnavailable as e:
        raise ValidateError(f"{name}'s published weights: {e}; pass --checkpoint FILE (its model.safetensors), or "
                            "fill the cache on a machine with network and run with HF_HUB_OFFLINE=1") from None
    except FileNotFoundError as e:  # a local-dir: folder without a weights file
        raise ValidateError(f"{name}: {e}") from None
    except ValueError as e:
        raise ValidateError(f"{name}'s published weights: {e}") from None


def weights_for(args) -> Weights:
    """The weights to score, as timm's validate.py picks them: --checkpoint's file, else the model's published
    weights (``--pretrained``, the default without --checkpoint; ``run`` reads them once every other input is
    checked). A training checkpoint supplies the architecture, the --model-kwargs and the class
    names it records; flags given here win."""
    from naflex.model import DEFAULT_MODEL
    from naflex.model.weights import is_npz
    from naflex.train.checkpoint import recorded_classes, recorded_model, sorted_class_order
    from naflex.train.cli import format_kwargs

    if not args.checkpoint:  # read once every other input is checked (``read_published``)
        name = args.model or DEFAULT_MODEL
        return Weights(None, "", name, dict(args.model_kwargs))
    path = args.checkpoint
    if not Path(path).is_file():
        raise ValidateError(f"checkpoint file not found: {path}")
    if args.pretrained:
        print("note: --checkpoint replaces the published weights --pretrained names (as in timm)")
    if is_npz(path):  # JAX / Flax: read into the model once it is built (``create_model``)
        return Weights({}, path, args.model or DEFAULT_MODEL, dict(args.model_kwargs))
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


def create_model(args, weights: Weights, num_dataset_classes: int, names_known: bool = True):
    """The model with ``weights`` loaded strictly; one-line errors for every mismatch. ``names_known`` False (tar
    shards that only give class indices): a head larger than the dataset is fine."""
    import naflex
    from naflex.model.weights import is_npz

    state, source, name, kwargs = weights.state, weights.source, weights.name, weights.kwargs
    if source and is_npz(source):
        return _npz_model(args, weights, num_dataset_classes)
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
    except (TypeError, ValueError) as e:  # an unknown keyword is timm's TypeError
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


def _npz_model(args, weights: Weights, num_dataset_classes: int):
    """The model with a JAX / Flax .npz checkpoint read into it as timm's ``load_checkpoint`` reads it: its
    classifier loads only when its class count is the model's (--num-classes, else the dataset's), as in timm."""
    import naflex
    from naflex.model.big_vision import load_npz

    num_classes = args.num_classes or num_dataset_classes
    try:
        model = naflex.create_model(weights.name, **weights.kwargs, num_classes=num_classes)
        left = load_npz(model, weights.source)
    except (TypeError, FileNotFoundError, ValueError) as e:
        raise ValidateError(str(e).splitlines()[0]) from None
    if "head.weight" in left:
        raise ValidateError(f"{weights.source} holds no {num_classes}-class classifier (a .npz classifier loads only "
                            "when its class count is the model's; pass --num-classes N)")
    return model


def prepare(args):
    """(model on its device in eval mode, dataset, what the rows name, the run's settings): every input checked
    first, the published weights read last."""
    import torch

    import naflex
    from .distributed import init_distributed
    from .eval_cli import check_args, check_attention

    check_args(args)
    torch.manual_seed(args.seed)
    if args.model:
        try:
            naflex.get_config(args.model)  # unknown name: registry's message, before any checkpoint is read
        except ValueError as e:
            raise ValidateError(str(e)) from None
    weights = weights_for(args)
    if args.gp:
        weights.kwargs["global_pool"] = args.gp
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_attention(args, weights.name, device)
    dataset = dataset_for(args, weights)
    if weights.state is None:
        weights.state, weights.source = read_published(weights.name)
    model = create_model(args, weights, len(dataset.classes), getattr(dataset, "class_names_known", True))
    try:
        dist = init_distributed(device)
    except RuntimeError as e:  # DeviceError (e.g. --device cuda without a GPU), process-group setup
        raise ValidateError(str(e)) from None
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.reparam:
        from timm.utils import reparameterize_model
        model = reparameterize_model(model)
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else torch.float32
    model = model.to(dist.device, model_dtype).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # timm's meaning: 4-D weights only (NaFlexViT has none)
    if not args.padded and hasattr(model, "set_attn_backend"):
        model.set_attn_backend(args.attn_backend)
    norm = naflex.data_config(model)
    norm = dict(norm, mean=args.mean or norm["mean"], std=args.std or norm["std"],
                interpolation=args.interpolation or norm["interpolation"], dtype=model_dtype,
                patch_size=model.patch_size)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode, dynamic=True)
    return model, dataset, (weights.name, weights.source), dist, norm


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
