"""Run outputs and console logging: log file, summary.csv, TensorBoard events, bad-files list, progress lines,
the per-epoch curves (curves.png) and, with ``--log-wandb``, the same per-epoch rows in Weights & Biases.

Only the primary rank writes (the others log warnings to stderr). ``ProgressMeter`` turns the host-side
clock into the figures a NaFlex run needs on top of timm's ``Train: epoch [step/total] loss lr`` line:
images/s, valid (non-padding) tokens/s, the fraction of wall time spent waiting for the loader, and ETA.
With stdout on a terminal a one-line progress bar is redrawn in place.
"""
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_logger = logging.getLogger('train')


def setup_logging(log_file: Optional[Path] = None, primary: bool = True) -> None:
    """Console (+ file on rank 0) logging with timestamps; non-primary ranks only show warnings."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, '_naflex', False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO if primary else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and primary:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._naflex = True
        root.addHandler(h)


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f'{h}:{m:02d}:{sec:02d}'


class RunWriter:
    """summary.csv + TensorBoard scalars + bad_files.txt in the run folder (no-ops when ``out_dir`` is None);
    ``close`` draws curves.png from summary.csv. ``wandb_run``: a started wandb run that gets every summary row."""

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
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

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
        with open(path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
            if new:
                w.writeheader()
            w.writerow({k: ('' if v is None else v) for k, v in row.items()})
        if self._wandb is not None:  # timm's --log-wandb: the same row, one wandb step per epoch
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=int(row['epoch']))

    def bad_files(self, paths: Iterable[str], epoch: int) -> None:
        """Append undecodable eval files (one path a line, like loaders.BadFileTracker for training)."""
        paths = list(paths)
        if self.out_dir is None or not paths:
            return
        with open(self.out_dir / 'bad_files.txt', 'a') as f:
            for p in paths:
                f.write(f'{p}\n')

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
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

    def __init__(self, total_steps: int, start_step: int = 0, show_bar: Optional[bool] = None):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = self.t_last = time.perf_counter()
        self.data_wait = self.data_wait_since_log = 0.0
        self.show_bar = sys.stdout.isatty() if show_bar is None else show_bar

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

    def epoch_totals(self) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {'time_s': elapsed, 'data_wait': min(1.0, self.data_wait / elapsed)}
