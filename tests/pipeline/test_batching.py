import numpy as np

from l2c.pipeline.batching import padding_fraction, token_budget_batches


def test_every_caption_in_exactly_one_batch_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=2000)
    batches = list(token_budget_batches(lengths, batch_tokens=4096, max_batch_size=64))
    idx = np.concatenate(batches)
    assert sorted(idx.tolist()) == list(range(2000))
    for b in batches:
        assert len(b) <= 64
        assert lengths[b].max() * len(b) <= 4096


def test_sorting_cuts_padding_against_fixed_batches():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(10, 20, 1000), rng.integers(100, 300, 1000)])
    rng.shuffle(lengths)
    sorted_batches = list(token_budget_batches(lengths, batch_tokens=8192, max_batch_size=32))
    naive = [np.arange(i, min(i + 32, len(lengths))) for i in range(0, len(lengths), 32)]
    assert padding_fraction(lengths, sorted_batches) < 0.1 < padding_fraction(lengths, naive)


def test_caption_longer_than_budget_gets_its_own_batch():
    batches = list(token_budget_batches([10, 5000, 10], batch_tokens=100))
    assert [len(b) for b in batches][0] == 1 and batches[0][0] == 1
