"""scripts/bench/timm_train.py, timm's NaFlex training loop from timm's pip package: bench_e2e.sh's regex parses
one Train: line per update, every image is trained on once per epoch, the logged LR is timm's scheduler's, the
loss is scaled by timm's rule and stays finite."""
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from repo_scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
timm_train = load_script("scripts/bench/timm_train.py")

# the pattern bench_e2e.sh parses timm's log with, read from the script so that the two cannot drift apart
_E2E = (REPO_ROOT / "scripts" / "bench" / "bench_e2e.sh").read_text()
E2E_LINE = re.compile(re.search(r'pat = re\.compile\(r"(Train: .*?)"\)\n', _E2E).group(1))
LR_LOSS = re.compile(r"Loss: (\S+) \((\S+)\).*LR: (\S+) ")

NUM_IMAGES = 24  # demo_dataset: 4 classes x 6 train images
LR, WARMUP_LR = 3e-4, 0.
CARD_AUG = ["--naflex-loader", "--opt", "nadamw", "--lr", str(LR), "--warmup-lr", str(WARMUP_LR),
            "--aa", "rand-m8-inc1-mstd1.0", "--weight-decay", ".1", "--grayscale-prob", ".1", "--drop-path", "0.2",
            "--reprob", "0", "--mixup", "0.8", "--cutmix", "1.0", "--remode", "pixel"]
TINY = ["--device", "cpu", "--model", "naflexvit_base_patch16_gap", "--model-kwargs", "embed_dim=64", "depth=2",
        "num_heads=4", "-j", "0", "--naflex-train-seq-lens", "32", "64", "--log-interval", "1", "--val-split", ""]


def _run(caplog, monkeypatch, data_dir, *flags):
    """Runs main() in-process; returns its results, its Train: lines, the (batch size, reference, mode) of every
    loss scale the loop asked for (one per update) and the number of samples timm's loader skipped."""
    scales = []
    real = timm_train.naflex_loss_scale

    def spy(batch_size, reference, mode):
        scales.append((batch_size, reference, mode))
        return real(batch_size, reference, mode)

    monkeypatch.setattr(timm_train, "naflex_loss_scale", spy)
    caplog.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = timm_train.main(["--data-dir", str(data_dir), *TINY, *CARD_AUG, *flags])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Train: ")]
    skipped = sum("Skipping sample" in str(w.message) for w in caught)
    return results, lines, scales, skipped


def _expected_lrs(updates_per_epoch, epochs, warmup_epochs, on_updates):
    """The LR timm's scheduler gives each update (logged before the update's step_update), from a stand-in
    optimizer stepped as timm's train.py steps it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched, num_epochs = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs,
                                            warmup_lr=WARMUP_LR, min_lr=0., step_on_epochs=not on_updates,
                                            updates_per_epoch=updates_per_epoch)
    assert num_epochs == epochs
    lrs = []
    for epoch in range(epochs):
        for i in range(updates_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step_update(epoch * updates_per_epoch + i + 1)
        sched.step(epoch + 1)
    return lrs


def _parse(lines):
    steps = [(int(e), int(i), int(n), float(t), float(r), float(d)) for e, i, n, t, r, d in
             (E2E_LINE.search(line).groups() for line in lines)]
    rest = [LR_LOSS.search(line).groups() for line in lines]
    return steps, [float(now) for now, _, _ in rest], [lr for _, _, lr in rest]


def test_card_flags_per_update_schedule(demo_dataset, caplog, monkeypatch):
    epochs, b = 2, 4
    results, lines, scales, skipped = _run(caplog, monkeypatch, demo_dataset, "-b", str(b),
                                           "--epochs", str(epochs), "--sched-on-updates")
    steps, losses, lrs = _parse(lines)
    n = steps[0][2]  # updates per epoch: len(timm's loader)
    assert len(lines) == len(steps) == len(scales) == epochs * n  # --log-interval 1: one line per update
    assert [(e, i) for e, i, *_ in steps] == [(e, i) for e in range(epochs) for i in range(n)]
    assert all(s[2] == n for s in steps)

    # timm's NaFlex loader schedules every image once per epoch in one process (no padding, no dropped last
    # batch) but skips an image whose transform raises (a warning; e.g. RandAugment's Posterize drawing 0 bits)
    sizes = [s for s, _, _ in scales]
    assert sum(sizes) == epochs * NUM_IMAGES - skipped and skipped <= 2
    assert all(ref == float(b) and mode == "linear" for _, ref, mode in scales)
    assert sizes[:n] != sizes[n:]  # set_epoch reshuffles the schedule (seeds 42 and 43 give different orders)
    # timm's batch size for L: b * max(L) tokens / L floored to a multiple of 8 (at least 1; at most what is left)
    assert max(sizes) == 8 and 1 <= min(sizes)
    # bench_e2e.sh recovers an update's images as time x rate, exact up to the log's rounding (time to 1 ms)
    for (*_, t, r, _), size in zip(steps, sizes):
        assert abs(t * r - size) <= size * 5e-4 / (t - 5e-4) + 0.01
    assert all(d >= 0 and t >= d for *_, t, _, d in steps)

    expected = _expected_lrs(n, epochs, warmup_epochs=5, on_updates=True)
    assert lrs == [f"{lr:.3e}" for lr in expected]
    assert lrs[0] == f"{WARMUP_LR:.3e}" and expected[1] > expected[0] and len(set(lrs)) == len(lrs)
    assert all(math.isfinite(x) for x in losses) and all(math.isfinite(r["train"]["loss"]) for r in results)
    assert [r["epoch"] for r in results] == list(range(epochs))


def test_per_epoch_schedule_steps_at_epoch_end(demo_dataset, caplog, monkeypatch):
    epochs = 2
    results, lines, _, _ = _run(caplog, monkeypatch, demo_dataset, "-b", "8", "--epochs", str(epochs),
                             "--warmup-epochs", "1", "--naflex-loss-scale", "none", "--log-interval", "50")
    steps, losses, lrs = _parse(lines)
    # --log-interval 50 > updates per epoch: the first and the last update of each epoch are logged
    n = steps[0][2]
    assert [(e, i) for e, i, *_ in steps] == [(0, 0), (0, n - 1), (1, 0), (1, n - 1)]
    expected = _expected_lrs(n, epochs, warmup_epochs=1, on_updates=False)
    assert lrs == [f"{expected[i]:.3e}" for i in (0, n - 1, n, 2 * n - 1)]
    assert lrs[0] == lrs[1] == f"{WARMUP_LR:.3e}" and lrs[2] == lrs[3] != lrs[0]  # stepped once, after epoch 0
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("mode, expected", [("linear", 0.25), ("sqrt", 0.5), ("none", 1.0)])
def test_naflex_loss_scale_is_timms_rule(mode, expected):
    assert timm_train.naflex_loss_scale(16, 64.0, mode) == pytest.approx(expected)
    assert timm_train.naflex_loss_scale(64, 64.0, mode) == 1.0
    assert timm_train.naflex_loss_scale(256, 64.0, mode) == pytest.approx(1 / expected)


def test_naflex_loss_scale_rejects_unknown_modes():
    with pytest.raises(ValueError):
        timm_train.naflex_loss_scale(16, 64.0, "log")


def test_refuses_validation(demo_dataset):
    with pytest.raises(SystemExit):
        timm_train.main(["--data-dir", str(demo_dataset), "--val-split", "val"])
