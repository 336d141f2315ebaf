"""Sequence-budget schedule: batch sizes, determinism, rank sharding, patch sizes (pure, no images)."""
import numpy as np
import pytest

from loaders.schedule import SeqLenSchedule, batch_size_for

LENS = (128, 256, 576, 784, 1024)


def test_batch_size_rule():
    budget = 64 * 1024
    assert [batch_size_for(L, budget) for L in LENS] == [512, 256, 112, 80, 64]
    assert batch_size_for(1024, 8 * 1024) == 8 and batch_size_for(1024, 1024) == 1
    from timm.data.naflex_dataset import calculate_naflex_batch_size
    for b in (1, 3, 32, 64, 256):
        for L in LENS:
            assert batch_size_for(L, b * 1024) == calculate_naflex_batch_size(b * 1024, L, divisor=8)


def test_every_index_once_and_deterministic():
    s = SeqLenSchedule(10_001, LENS, 64 * 1024, seed=5)
    for epoch in (0, 1):
        steps = s.steps(epoch)
        idx = np.concatenate([st.indices for st in steps])
        assert np.array_equal(np.sort(idx), np.arange(10_001))
        full = [st for st in steps if len(st.indices) != batch_size_for(st.seq_len, 64 * 1024)]
        assert len(full) <= 1  # only the epoch's last canonical step is short
    again = SeqLenSchedule(10_001, LENS, 64 * 1024, seed=5)
    for a, b in zip(s.steps(3), again.steps(3)):
        assert a.seq_len == b.seq_len and np.array_equal(a.indices, b.indices)
    assert [x.seq_len for x in s.steps(0)] != [x.seq_len for x in s.steps(1)]
    assert len(s) == len(again) and len(s.steps(0)) == len(s.steps(7))


@pytest.mark.parametrize('n,world', [(1000, 4), (1003, 4), (7, 3), (50, 8), (3, 8)])
def test_ranks_same_schedule_disjoint_shards(n, world):
    scheds = [SeqLenSchedule(n, LENS, 8 * 1024, seed=1, rank=r, world_size=world,
                             patch_sizes=(8, 16, 32), patch_size_probs=(1, 2, 1)) for r in range(world)]
    for epoch in (0, 2):
        per_rank = [sc.steps(epoch) for sc in scheds]
        assert len({len(p) for p in per_rank}) == 1
        for steps in zip(*per_rank):
            assert len({(st.seq_len, st.patch_size, len(st.indices)) for st in steps}) == 1
        all_idx = np.concatenate([np.concatenate([st.indices for st in p]) for p in per_rank])
        pad = -(-n // world) * world - n
        assert len(all_idx) == n + pad
        values, counts = np.unique(all_idx, return_counts=True)
        assert np.array_equal(values, np.arange(n)) and counts.sum() - n == pad
        assert counts.max() <= -(-(n + pad) // n)


def test_patch_size_probs():
    s = SeqLenSchedule(200_000, LENS, 4 * 1024, seed=0, patch_sizes=(8, 16), patch_size_probs=(0.25, 0.75))
    sizes = [st.patch_size for st in s.steps(0)]
    frac16 = sizes.count(16) / len(sizes)
    assert 0.7 < frac16 < 0.8
    with pytest.raises(ValueError):
        SeqLenSchedule(10, LENS, 1024, patch_sizes=(8, 16), patch_size_probs=(1,))


def test_canonical_multiset_equals_timm():
    import torch
    from timm.data.naflex_dataset import NaFlexMapDatasetWrapper

    class Fake(torch.utils.data.Dataset):
        def __len__(self):
            return 5784

        def __getitem__(self, i):
            return None, 0

    for seed in (0, 42):
        ref = NaFlexMapDatasetWrapper(Fake(), seq_lens=LENS, max_tokens_per_batch=64 * 1024, seed=seed)
        ours = SeqLenSchedule(5784, LENS, 64 * 1024, seed=seed)
        assert ours.canonical == ref._canonical_batch_schedule
