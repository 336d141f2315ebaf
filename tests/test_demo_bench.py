"""Smoke tests for scripts/bench/bench_model.py: it runs tiny on CPU, and its three variants compute the same function."""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import bench_model  # noqa: E402

import naflex  # noqa: E402


def test_schedule_follows_token_budget():
    sched = bench_model.step_schedule([128, 256, 576, 784, 1024], 64 * 1024, 40, seed=0)
    assert [L for L, _ in sched[:5]] == [128, 256, 576, 784, 1024]  # warmup covers every length
    assert all(b == 65536 // L // 8 * 8 for L, b in sched)
    grids = bench_model.image_grids(576, 200, random.Random(0))
    assert all(h * w <= 576 for h, w in grids) and sum(h * w for h, w in grids) / 200 > 0.9 * 576


def test_variants_agree_and_run():
    torch.manual_seed(0)
    ours = naflex.create_model("naflexvit_tiny_test", num_classes=10).eval()
    twin = bench_model.timm_twin(ours, "naflexvit_tiny_test", 0.0).eval()
    grids = bench_model.image_grids(36, 5, random.Random(1))
    packed, padded, _, T = bench_model.make_batches(grids, 36, 16 * 16 * 3, 10, "cpu", 0)
    assert T == sum(h * w for h, w in grids)
    with torch.no_grad():
        a, b, c = ours(packed), ours(padded), twin(padded)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)
    res = bench_model.main(["--device", "cpu", "--model", "naflexvit_tiny_test", "-b", "2", "--seq-lens", "16", "32",
                            "--steps", "2", "--warmup", "1"])
    assert [r["variant"] for r in res] == ["ours_packed", "ours_padded", "timm_padded"]
    assert all(r["images_per_s"] > 0 and r["valid_tokens_per_s"] > 0 and r["steps"] == 2 for r in res)
