"""train.py's command line: timm's flag names and meanings, mapped onto the typed configs (naflex.train.config).

Each flag is declared once, on the config field it sets (``augment.config.flag``: names, help, the field's type and
default), and this module builds the parser from those fields and the ``Config`` from the parsed values. The defaults
are timm's train.py values (epochs 300, warmup-epochs 5, sched cosine, smoothing 0.1, naflex-max-seq-len 576,
checkpoint-hist 10, seed 42, ...), so the NaFlexViT model card command runs as written. Additions of ours:
``--no-naflex-packing`` (timm-style padded batches instead of packed sequences, NaViT arXiv:2307.06304),
``--attn-backend``, ``--no-jpeg-draft`` and ``--exif-orientation`` (decoding switches; without them training decodes
JPEGs with reduced DCT where it applies, and no EXIF rotation), ``--bad-file-limit`` (the share of undecodable training
files that stops a run; timm has no such stop).

``-c/--config file.yaml`` sets defaults (unknown keys are an error); flags given on the command line win. The
resolved namespace is what ``train.py`` writes to ``<output>/args.yaml`` (a valid ``-c`` file).
``config_from_args`` builds the ``Config``; ``check_args`` validates all of it and reports every problem in
one ``ConfigError`` line that names the flags, before anything is read or created on disk.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from augment.mixup import MixupConfig

from .config import Config
from .timm_flags import TRAIN_REFUSED, refuse

_DEFAULTS = Config(mixup=MixupConfig(num_classes=0))  # where every flag's default is read from

Target = Tuple[str, str, Optional[Callable]]  # (config section, field, value conversion)


class ConfigError(ValueError):
    """A configuration mistake the user can fix; train.py prints it as one line and exits with status 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once and only when it says something: help texts that already explain the default keep
    their wording; switches (off unless given) and unset values (None, '') show none."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default in (None, '', False) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become a ConfigError, and which records the config field of every flag."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.targets: Dict[str, List[Target]] = {}    # dest -> the config fields it sets
        self.flag_of: Dict[Tuple[str, str], str] = {}  # (section, field) -> '-b/--batch-size'

    def error(self, message):
        raise ConfigError(f'{message} (see train.py --help)')


class ParseKwargs(argparse.Action):
    """``--model-kwargs`` / ``--opt-kwargs key=value ...`` as timm's ``timm.utils.ParseKwargs``: each value is read
    as a Python literal (``192``, ``0.1``, ``True``, ``(8, 8)``), anything else as a string (``global_pool=avg``).
    Tuples become lists so args.yaml stays plain YAML (the optimizer gets tuples back); a word without ``=`` is
    one error line (timm raises a ValueError)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            if not item:
                continue  # as timm's ParseKwargs
            key, sep, text = item.partition('=')
            if not sep or not key:
                parser.error(f'{option_string}: expected KEY=VALUE, got {item!r}')
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            kwargs[key] = list(value) if isinstance(value, tuple) else value
        setattr(namespace, self.dest, kwargs)


def format_kwargs(kwargs: dict) -> str:
    """The inverse of ``ParseKwargs``: ``{'depth': 6, 'pos_embed_grid_size': [8, 8]}`` as words the command line
    takes back (``depth=6 pos_embed_grid_size=(8,8)``)."""
    def word(v):
        if isinstance(v, (list, tuple)):
            return repr(tuple(v)).replace(' ', '')
        if isinstance(v, str):
            try:
                ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v  # ParseKwargs reads it back as this string
        return repr(v)
    return ' '.join(f'{k}={word(v)}' for k, v in kwargs.items())


GROUPS = {  # train.py --help sections, in order; a config's flags go to its section's unless they name another
    'dataset': 'Dataset', 'model': 'Model', 'device': 'Device and precision',
    'optim': 'Optimizer (timm.optim.create_optimizer_v2)',
    'sched': 'Learning-rate schedule (timm.scheduler.create_scheduler_v2)',
    'aug': 'Augmentation and regularization', 'ema': 'EMA', 'naflex': 'NaFlex', 'run': 'Run'}
SECTION_GROUP = {'data': 'dataset', 'loader': 'naflex', 'eval': 'naflex', 'aug': 'aug', 'mixup': 'aug',
                 'model': 'model', 'optim': 'optim', 'sched': 'sched', 'ema': 'ema', 'train': 'run', 'run': 'run'}


def _declared_fields():
    """(section, field, its type, its flag spec or its same-flag spec) of every config field with a flag."""
    for section in Config.SECTIONS:
        cls = type(getattr(_DEFAULTS, section))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            spec = f.metadata.get('flag') or f.metadata.get('same_flag')
            if spec is not None:
                yield section, f, hints[f.name], spec


def _argparse_kwargs(tp, spec: dict) -> dict:
    """argparse keywords the field's type implies (bool: a switch, Tuple[X, ...]: one or more X, int / float, a
    dict: KEY=VALUE words), overridden by those the flag names."""
    if typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))  # Optional[X] -> X
    kw = {}
    if tp is bool:
        kw = dict(action='store_true')
    elif typing.get_origin(tp) is tuple:
        kw = dict(nargs='+', type=typing.get_args(tp)[0])
    elif typing.get_origin(tp) is dict:
        kw = dict(nargs='*', action=ParseKwargs, metavar='KEY=VALUE')
    elif tp in (int, float):
        kw = dict(type=tp)
    return {**kw, **spec['kwargs']}


def _conversion(spec: dict) -> Optional[Callable]:
    if spec['invert']:
        return _not
    return spec['convert']


def _not(v):
    return not v


def _add_config_flags(p: _Parser, groups: Sequence[str]) -> None:
    """One argparse flag per declared config field (augment.config.flag), in the sections of ``groups``."""
    fields = list(_declared_fields())
    also: Dict[str, List[Target]] = {}
    for section, f, _, spec in fields:
        if 'name' in spec:  # set by another field's flag
            also.setdefault(spec['name'], []).append((section, f.name, _conversion(spec)))
    sections = {key: p.add_argument_group(GROUPS[key]) for key in GROUPS if key in groups}
    for section, f, tp, spec in fields:
        key = spec.get('group') or SECTION_GROUP[section]
        if 'names' not in spec or key not in sections:
            continue
        if spec['invert']:
            default = False
        elif spec['cli_default'] is not dataclasses.MISSING:
            default = spec['cli_default']
        else:
            default = getattr(getattr(_DEFAULTS, section), f.name)
        kw = _argparse_kwargs(tp, spec)
        if kw.get('action') == 'store_true':
            default = bool(default)  # a switch: off unless given (--pin-mem's None means 'when CUDA is there')
        if isinstance(default, tuple) and kw.get('nargs') in ('+', '*'):
            default = list(default)  # argparse yields lists; args.yaml stays plain YAML
        action = sections[key].add_argument(*spec['names'], default=default, help=spec['help'], **kw)
        targets = [(section, f.name, _conversion(spec))] + [t for n in spec['names'] for t in also.get(n, [])]
        p.targets[action.dest] = targets
        for target in targets:
            p.flag_of.setdefault(target[:2], '/'.join(spec['names']))
    _cli_only_flags(sections)


def _cli_only_flags(sections: dict) -> None:
    """timm's flags that set no config field."""
    if 'dataset' in sections:
        sections['dataset'].add_argument('data', nargs='?', metavar='DIR',
                                         help='the dataset root (positional, deprecated in timm: use --data-dir)')
    if 'device' in sections:
        sections['device'].add_argument('--local-rank', '--local_rank', type=int, default=0,
                                        help="accepted for torch.distributed.launch; the device follows torchrun's "
                                             "LOCAL_RANK")
    if 'naflex' in sections:
        sections['naflex'].add_argument('--naflex-loader', action='store_true', default=False,
                                        help='accepted for timm compatibility; the NaFlex loader is always used')


def build_parser(groups: Sequence[str] = tuple(GROUPS), prog: str = 'train.py') -> _Parser:
    """train.py's parser; ``groups`` picks --help sections for tools that take a subset (the loader benchmarks)."""
    p = _Parser(prog=prog, description='Train a NaFlexViT (timm-compatible flags).', formatter_class=_HelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file whose keys set flag defaults')
    _add_config_flags(p, groups)
    if tuple(groups) == tuple(GROUPS):
        refuse(p, TRAIN_REFUSED)  # timm's flags that do not apply: one line each, with the reason
    return p


def config_from_args(args: argparse.Namespace, parser: Optional[_Parser] = None) -> Config:
    """The typed configuration the flags describe (nothing is validated or resolved here)."""
    parser = parser or build_parser()
    parts: Dict[str, dict] = {s: {} for s in Config.SECTIONS}
    for dest, targets in parser.targets.items():
        if not hasattr(args, dest):
            continue
        for section, field, conv in targets:
            value = getattr(args, dest)
            value = conv(value) if conv is not None else value
            parts[section][field] = tuple(value) if isinstance(value, list) else value
    if parts['eval'].get('batch_size') is None and 'batch_size' in parts['loader']:
        parts['eval']['batch_size'] = parts['loader']['batch_size']  # -vb defaults to -b
    mix = parts.pop('mixup')
    on = mix.get('mixup_alpha', 0) > 0 or mix.get('cutmix_alpha', 0) > 0
    cfg = Config(**{s: dataclasses.replace(getattr(_DEFAULTS, s), **v) for s, v in parts.items()})
    cfg.mixup = MixupConfig(num_classes=0, **mix) if on else None
    return cfg


def flag_namer(parser: _Parser) -> Callable[[str, str], str]:
    """(section, field) -> the flag that sets it, for messages."""
    return lambda section, field: parser.flag_of.get((section, field), f'{section}.{field}')


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line that keeps where it happened (1-based line and column)."""
    def where(mark):
        return f'line {mark.line + 1}, column {mark.column + 1}'
    problem, mark = getattr(e, 'problem', None), getattr(e, 'problem_mark', None)
    if not problem:
        return ' '.join(str(e).split())
    text = f'{where(mark)}: {problem}' if mark is not None else problem
    context, context_mark = getattr(e, 'context', None), getattr(e, 'context_mark', None)
    if context:
        text += f' ({context}' + (f' started at {where(context_mark)})' if context_mark is not None else ')')
    return text


def _load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {_yaml_problem(e)}') from None
    if not isinstance(cfg, dict):
        raise ConfigError(f'config file {path} must hold a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f'config file {path} has unknown keys: {", ".join(unknown)}')
    cfg.pop('config', None)
    parser.set_defaults(**cfg)


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Config]:
    """Parse flags (after ``-c`` YAML defaults) and check them; returns the namespace and the checked Config."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    cfg_args, _ = config_parser.parse_known_args(argv)
    if cfg_args.config:
        _load_yaml_defaults(parser, cfg_args.config)
    args = parser.parse_args(argv)
    if args.data and not args.data_dir:
        args.data_dir = args.data  # timm's positional dataset root
    return args, check_args(args, parser)


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse flags (after ``-c`` YAML defaults) and check them; returns the namespace and its args.yaml text."""
    args, _ = parse_config(argv)
    return args, args_yaml(args)


def args_yaml(args: argparse.Namespace, **resolved) -> str:
    """``args`` (with ``resolved`` values such as the derived lr) as the YAML text of args.yaml (a ``-c`` file)."""
    return yaml.safe_dump(dict(vars(args), **resolved), default_flow_style=False, sort_keys=True)


# where a run is written and read from: these differ between a run and its resumption without changing it
_RUN_LOCATION = ('config', 'resume', 'no_resume_opt', 'output', 'experiment')


def changed_flags(before, now: Dict, parser: Optional[_Parser] = None) -> List[str]:
    """'--flag OLD -> NEW' for every flag whose value in ``now`` (resolved args) differs from ``before`` (the args
    stored in a checkpoint: a dict, or timm's argparse.Namespace); flags only one of them knows are skipped."""
    before = vars(before) if isinstance(before, argparse.Namespace) else dict(before or {})
    parser = parser or build_parser()
    flag = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return [f'{flag.get(k, k)} {before[k]} -> {v}' for k, v in sorted(now.items())
            if k in before and k not in _RUN_LOCATION and before[k] != v]


def check_args(args: argparse.Namespace, parser: Optional[_Parser] = None) -> Config:
    """Validate every part of the configuration; ConfigError (one line naming the flags) on any problem."""
    parser = parser or build_parser()
    cfg = config_from_args(args, parser)
    try:
        cfg.validate(flag_namer(parser))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


__all__ = ['ConfigError', 'ParseKwargs', 'args_yaml', 'build_parser', 'changed_flags', 'check_args',
           'config_from_args', 'flag_namer', 'format_kwargs', 'parse_args', 'parse_config']
