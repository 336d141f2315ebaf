"""Run outputs and console logging: log file, summary.csv, TensorBoard events, progress lines, the per-epoch
curves (curves.png) and, with ``--log-wandb``, the same per-epoch rows in Weights & Biases.

Only the primary rank writes (the others log warnings to stderr). ``ProgressMeter`` turns the host-side
clock into the figures a NaFlex run needs on top of timm's ``Train: epoch [step/total] loss lr`` line:
images/s, valid (non-padding) tokens/s, the fraction of wall time spent waiting for the loader, and ETA.
With stdout on a terminal a one-line progress bar is redrawn in place.
"""
import csv
import io
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import atomic_write, writing

_logger = logging.getLogger('train')


class _LogFile(logging.FileHandler):
    """train.log; a write that fails (full disk) is reported once, in one line, instead of logging's
    traceback per record: the console keeps the log, and the run stops at its next checkpoint write."""

    failed = False

    def handleError(self, record) -> None:
        if not self.failed:
            self.failed = True
            cause = sys.exc_info()[1]
            sys.stderr.write(f'warning: could not write {self.baseFilename}: '
                             f'{getattr(cause, "strerror", None) or cause}; logging to the console only\n')


def setup_logging(log_file: Optional[Path] = None, primary: bool = True) -> None:
    """Console (+ file on rank 0) logging with timestamps; non-primary ranks only show warnings.

    Without ``log_file`` the primary rank keeps its records in memory until ``attach_log_file`` names the file:
    train.py checks every input before it creates the run folder, and the log file still starts at the top.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, '_naflex', False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO if primary else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stdout)]
    if primary:
        handlers.append(_LogFile(log_file) if log_file is not None else _EarlyRecords())
    for h in handlers:
        _own(h)


class _EarlyRecords(logging.handlers.MemoryHandler):
    """Holds the records logged before the run folder exists (never flushes on its own)."""

    def __init__(self):
        super().__init__(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)

    def shouldFlush(self, record) -> bool:
        return False


_OURS = ('train', 'naflex', 'loaders', 'augment')


def _the_runs(record: logging.LogRecord) -> bool:
    """The run's own lines, and warnings from anywhere; a library's INFO lines (matplotlib announcing its font
    cache, ...) stay out of the console and train.log."""
    return record.levelno >= logging.WARNING or record.name.split('.')[0] in _OURS


def _own(handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S'))
    handler.addFilter(_the_runs)
    handler._naflex = True
    logging.getLogger().addHandler(handler)


def attach_log_file(log_file: Path) -> None:
    """Start writing ``log_file`` (primary rank), beginning with the records kept since ``setup_logging``."""
    root = logging.getLogger()
    early = [h for h in root.handlers if isinstance(h, _EarlyRecords)]
    if not early:
        return  # a non-primary rank, or the file is already attached
    file_handler = _LogFile(log_file)
    _own(file_handler)
    for h in early:
        h.setTarget(file_handler)
        h.flush()
        root.removeHandler(h)
        h.close()


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f'{h}:{m:02d}:{sec:02d}'


class RunWriter:
    """summary.csv + TensorBoard scalars in the run folder (no-ops when ``out_dir`` is None; bad_files.txt is
    written by naflex.train.bad_files); ``close`` draws curves.png from summary.csv. ``wandb_run``: a started wandb
    run that gets every summary row."""

    def __init__(self, out_dir: Optional[Path], tensorboard: bool = True, wandb_run=None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._wandb = wandb_run
        self._tb = None
        if self.out_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.out_dir / 'tensorboard'))
            except ImportError:  # tensorboard is a declared dependency; keep training if it is missing
                _logger.warning('tensorboard not installed: no event files will be written')

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self._tb is None:
            return
        try:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        except OSError as e:  # the event writer's thread failed (full disk): TensorBoard is optional output
            self._tb_failed(e)

    def summary(self, row: Dict[str, object]) -> None:
        """Append one epoch row to summary.csv (header written with the first row)."""
        if self.out_dir is None:
            return
        path = self.out_dir / 'summary.csv'
        new = not path.exists() or path.stat().st_size == 0
        fields = list(row)
        if not new:  # keep the existing header (a resumed run appends to it)
            with open(path, newline='') as f:
                fields = next(csv.reader(f), fields)
        with writing(path), open(path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
            if new:
                w.writeheader()
            w.writerow({k: ('' if v is None else v) for k, v in row.items()})
        if self._wandb is not None:  # timm's --log-wandb: the same row, one wandb step per epoch
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=int(row['epoch']))

    def resume_at(self, epoch: int) -> None:
        """Drop summary.csv rows of ``epoch`` and later: a run that stopped after writing an epoch's row but
        before its checkpoint (a failed save, SIGKILL) trains that epoch again and writes the row again."""
        path = None if self.out_dir is None else self.out_dir / 'summary.csv'
        if path is None or not path.is_file():
            return
        with open(path, newline='') as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch]
        if len(keep) < len(rows):
            text = io.StringIO(newline='')
            csv.writer(text).writerows(keep)
            atomic_write(path, lambda f: f.write(text.getvalue().encode()))

    def _tb_failed(self, e: OSError) -> None:
        _logger.warning(f'could not write TensorBoard events in {self.out_dir / "tensorboard"}: '
                        f'{e.strerror or e}; no more events are written')
        self._tb = None

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.flush()
                self._tb.close()
            except OSError as e:
                self._tb_failed(e)
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.out_dir is not None and (self.out_dir / 'summary.csv').is_file():
            try:
                plot_curves(self.out_dir / 'summary.csv', self.out_dir / 'curves.png')
            except Exception as e:  # a picture is never worth a failed run
                _logger.warning(f'no curves.png written: {type(e).__name__}: {e}')


def _epoch_rows(summary_csv: Path) -> List[Dict[str, float]]:
    """summary.csv's rows by epoch, numbers only; a resumed run that repeated epochs keeps the latest row."""
    with open(summary_csv, newline='') as f:
        rows = {}
        for row in csv.DictReader(f):
            cells = {k: float(v) for k, v in row.items() if k and v not in ('', None)}
            if 'epoch' in cells:
                rows[int(cells['epoch'])] = cells
    return [rows[e] for e in sorted(rows)]


def plot_curves(summary_csv: Path, out_png: Path) -> Optional[Path]:
    """Loss, top-1 and learning rate per epoch (train and eval, EMA when present) from summary.csv as one PNG;
    None when the file holds no epoch yet."""
    rows = _epoch_rows(summary_csv)
    if not rows:
        return None
    # A bare Figure draws with Agg and touches no pyplot state: no display, no global backend switch.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    panels = (('loss', ('train_loss', 'eval_loss', 'ema_loss')), ('top-1 (%)', ('eval_top1', 'ema_top1')),
              ('learning rate', ('lr',)))
    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, len(panels))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            points = [(r['epoch'], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker='o' if len(points) < 30 else None, label=key)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.has_data() and len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f'{Path(summary_csv).parent.name}: {len(rows)} epochs', fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


class ProgressMeter:
    """Host-side timing for one epoch: data wait vs. step time, throughput between log points, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, show_bar: Optional[bool] = None,
                 carried: Optional[Dict] = None):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = self.t_last = time.perf_counter()
        self.data_wait = self.data_wait_since_log = 0.0
        self.show_bar = sys.stdout.isatty() if show_bar is None else show_bar
        # time already spent on this epoch before a mid-epoch resume (``state_dict`` of the stopped run)
        self.carried_time = float((carried or {}).get('time_s', 0.0))
        self.carried_wait = float((carried or {}).get('data_wait_s', 0.0))

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds
        self.data_wait_since_log += seconds

    def window(self, step: int, tokens: float, images: float) -> Dict[str, float]:
        """Figures since the previous call; ``tokens`` / ``images``: valid tokens / images in the window over all
        ranks (the engine counts them). Resets the window."""
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        done = step + 1 - self.start_step
        per_step = (now - self.t0) / max(done, 1)
        out = {
            'images_per_s': images / dt,
            'tokens_per_s': tokens / dt,
            'data_wait': min(1.0, self.data_wait_since_log / dt),
            'eta_s': per_step * (self.total - step - 1),
        }
        self.t_last = now
        self.data_wait_since_log = 0.0
        return out

    def bar(self, step: int) -> None:
        """Redraw a one-line progress bar in place (terminal only); ``clear_bar`` before printing a log line."""
        if not self.show_bar:
            return
        width = 30
        filled = int(width * (step + 1) / max(self.total, 1))
        sys.stdout.write(f'\r[{"#" * filled}{"." * (width - filled)}] {step + 1}/{self.total}')
        sys.stdout.flush()

    def clear_bar(self) -> None:
        if self.show_bar:
            sys.stdout.write('\r\033[K')
            sys.stdout.flush()

    def state_dict(self) -> Dict[str, float]:
        """The epoch's training time and data wait so far (for a mid-epoch checkpoint)."""
        return {'time_s': self.carried_time + time.perf_counter() - self.t0,
                'data_wait_s': self.carried_wait + self.data_wait}

    def epoch_totals(self) -> Dict[str, float]:
        """Time spent training this epoch (also before a resume; the pause in between does not count)."""
        elapsed = max(self.carried_time + time.perf_counter() - self.t0, 1e-9)
        return {'time_s': elapsed, 'data_wait': min(1.0, (self.carried_wait + self.data_wait) / elapsed)}
