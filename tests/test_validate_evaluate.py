"""naflex.train.evaluate on hand-made batches: metric arithmetic, soft targets, and the all-reduce over 2 gloo ranks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from naflex.train.evaluate import evaluate


class _Echo(torch.nn.Module):
    """'Model' whose logits are the batch's 'logits' entry (lets a test choose every prediction)."""
    num_classes = 6

    def forward(self, inputs):
        return inputs["logits"]


def _batches(logits, targets, bs, tokens_per_image=3):
    out = []
    for i in range(0, len(targets), bs):
        lg, tg = logits[i:i + bs], targets[i:i + bs]
        b = len(tg)
        out.append(({"logits": lg, "seq_lens": torch.full((b,), tokens_per_image, dtype=torch.int32),
                     "patches": torch.zeros(b * tokens_per_image, 4), "bad_files": []}, tg))
    return out


class _DeviceLoader(list):
    yields_device_batches = True


def _reference(logits, targets):
    top1 = (logits.argmax(-1) == targets).float().mean().item() * 100
    top5 = (logits.topk(5, -1).indices == targets[:, None]).any(-1).float().mean().item() * 100
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    return top1, top5, loss


def test_metrics_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 6, generator=g)
    targets = torch.randint(0, 6, (23,), generator=g)
    m = evaluate(_Echo(), _DeviceLoader(_batches(logits, targets, 5)), "cpu", collect_logits=True)
    top1, top5, loss = _reference(logits, targets)
    assert m["images"] == 23 and m["valid_tokens"] == 69 and m["bad_files"] == 0
    assert m["top1"] == pytest.approx(top1) and m["top5"] == pytest.approx(top5)
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert torch.equal(m["logits"], logits) and torch.equal(m["targets"], targets)
    assert m["images_per_s"] > 0


def test_soft_targets_and_bad_files():
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0]])
    soft = torch.tensor([[0.9, 0.1, 0, 0, 0, 0], [0.0, 0.8, 0.2, 0, 0, 0]])
    (inp, _), = _batches(logits, torch.zeros(2, dtype=torch.long), 2)
    inp["bad_files"] = ["/x/broken.jpg"]
    m = evaluate(_Echo(), _DeviceLoader([(inp, soft)]), "cpu")
    assert m["top1"] == pytest.approx(50.0)  # argmax targets are 0 and 1
    assert m["bad_files"] == 1 and m["bad_file_paths"] == ["/x/broken.jpg"]
    ref = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean().item()
    assert m["loss"] == pytest.approx(ref, rel=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, logits, targets, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # Strided shard like a sampler without padding: 11 images -> 6 + 5.
    idx = list(range(rank, len(targets), world))
    m = evaluate(_Echo(), _DeviceLoader(_batches(logits[idx], targets[idx], 4)), "cpu")
    q.put((rank, m["images"], m["top1"], m["top5"], m["loss"]))
    dist.destroy_process_group()


def test_two_rank_all_reduce_counts_each_image_once():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 6, generator=g)
    targets = torch.randint(0, 6, (11,), generator=g)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), logits, targets, q), nprocs=2, join=True,
                       start_method="spawn")
    res = sorted(q.get(timeout=30) for _ in range(2))
    top1, top5, loss = _reference(logits, targets)
    for _, n, t1, t5, ls in res:
        assert n == 11
        assert t1 == pytest.approx(top1) and t5 == pytest.approx(top5) and ls == pytest.approx(loss, rel=1e-5)
