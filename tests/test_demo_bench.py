"""scripts/bench/bench_model.py times what training runs: the loader's schedule, the loader's packed / padded
batches normalised by the prefetcher, the Trainer's step; its variants compute the same function; it runs tiny
on CPU and writes the JSON fields scripts/bench/device_check.sh reads."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import bench_model  # noqa: E402

import naflex  # noqa: E402
from loaders.schedule import SeqLenSchedule, batch_size_for  # noqa: E402
from naflex.model import batch as B  # noqa: E402
from naflex.train.engine import Trainer  # noqa: E402

SEQ_LENS = [128, 256, 576, 784, 1024]


def test_schedule_is_the_loaders():
    budget = 64 * 1024
    warmup, timed = bench_model.bench_schedule(SEQ_LENS, budget, 3, 40, seed=0)
    assert warmup == [(L, batch_size_for(L, budget)) for L in SEQ_LENS]  # every length before timing
    assert len(timed) == 40 and all(b == batch_size_for(L, budget) == budget // L // 8 * 8 for L, b in timed)
    loader_steps = SeqLenSchedule(41 * batch_size_for(128, budget), SEQ_LENS, budget, seed=0).steps(0)
    full = [(s.seq_len, len(s.indices)) for s in loader_steps]
    assert timed == [st for st in full if st[1] == batch_size_for(st[0], budget)][:40]  # the epoch's short step out
    assert len({L for L, _ in timed}) == len(SEQ_LENS)
    longer_warmup, _ = bench_model.bench_schedule(SEQ_LENS, budget, 8, 40, seed=0)
    assert longer_warmup[:5] == warmup and longer_warmup[5:] == timed[:3]


def _bench(variants=("ours_packed", "ours_padded", "timm_padded", "vit_plain"), **kw):
    argv = ["--device", "cpu", "--model", "naflexvit_tiny_test", "-b", "4", "--seq-lens", "36", "64",
            "--steps", "2", "--warmup", "1", "--variants", *variants]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return bench_model.Bench(bench_model.parse_args(argv))


def test_batches_are_the_loaders_packed_and_padded_layouts():
    bench = _bench()
    norm = naflex.data_config(bench.ours)
    for L, b in bench.batches.items():
        packed, padded = b["packed"], b["padded"]
        assert B.is_packed(packed) and not B.is_packed(padded) and "bad_files" not in packed
        assert set(B.PACKED_KEYS) <= set(packed) and set(B.PADDED_KEYS) <= set(padded)
        n = batch_size_for(L, bench.budget)
        assert B.num_images(packed) == B.num_images(padded) == n == b["target"].shape[0]
        assert B.seq_len(packed) == B.seq_len(padded) == L
        lens = packed["seq_lens"].long()
        assert int(lens.max()) <= L and lens.float().mean() > 0.85 * L  # grids fill L as the transforms do
        assert b["figures"][:2] == (n, int(lens.sum()))
        # the same pixels in both layouts, normalised on the "device" like the prefetcher does for training
        torch.testing.assert_close(packed["patches"], padded["patches"][padded["patch_valid"]])
        lo, hi = (0 - norm["mean"][0]) / norm["std"][0], (1 - norm["mean"][0]) / norm["std"][0]
        assert packed["patches"].dtype == torch.float32 and lo - 1e-6 <= packed["patches"].min() < packed[
            "patches"].max() <= hi + 1e-6
        assert b["image"].shape == (n, 3, *(d * 16 for d in bench_model.square_grid(L)))


def test_variants_agree_and_step_is_the_trainer():
    bench = _bench(drop_path=0.0)
    ours = bench.ours.eval()
    twin = bench_model.timm_twin(ours, "naflexvit_tiny_test", 0.0).eval()
    b = bench.batches[36]
    with torch.no_grad():
        a, p, t = ours(b["packed"]), ours(b["padded"]), twin(b["padded"])
    torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p, t, atol=1e-4, rtol=1e-4)

    step = bench.build("ours_packed")
    trainer = step.trainer
    assert isinstance(trainer, Trainer) and trainer.cfg.smoothing == bench_model.SMOOTHING
    before = [q.detach().clone() for q in trainer.module.parameters()]
    step(36)
    assert step.state.num_updates == 1
    assert any(not torch.equal(x, q) for x, q in zip(before, trainer.module.parameters()))


def test_main_writes_what_device_check_reads(tmp_path):
    out = tmp_path / "bench.json"
    res = bench_model.main(["--device", "cpu", "--model", "naflexvit_tiny_test", "-b", "2", "--seq-lens", "16", "32",
                            "--steps", "2", "--warmup", "1", "--json", str(out)])
    assert [r["variant"] for r in res] == ["ours_packed", "ours_padded", "timm_padded"]
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and [r["variant"] for r in saved["results"]] == [r["variant"] for r in res]
    for r in saved["results"]:
        assert r["steps"] == 2 and r["images_per_s"] > 0 and r["valid_tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["warmup_s"] > 0 and set(r["first_call_s"]) == {"16", "32"} and r["first_calls_total_s"] > 0
