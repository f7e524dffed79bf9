"""The mount's compact kernel lookup counts (cloudfs.lookups)."""

from __future__ import annotations

import random

from cloudfs.lookups import PAGE, LookupCounts


def test_counts_follow_a_dict_model() -> None:
    """Random references taken and given back, counts past one byte included, agree
    with a plain dict; pages of forgotten inodes go."""
    rng = random.Random(5)
    counts = LookupCounts()
    model: dict[int, int] = {}
    inodes = [rng.randrange(1, 5000) for _ in range(300)] + list(range(10_000, 10_200))
    for _ in range(20_000):
        ino = rng.choice(inodes)
        if rng.random() < 0.55:
            n = rng.choice([1, 1, 1, 2, 300])
            model[ino] = model.get(ino, 0) + n
            assert counts.add(ino, n) == model[ino]
        else:
            n = rng.choice([1, 2, 200, 1000])
            left = max(model.get(ino, 0) - n, 0)
            assert counts.forget(ino, n) == left
            if left:
                model[ino] = left
            else:
                model.pop(ino, None)
        assert counts.get(ino) == model.get(ino, 0)
    assert list(counts) == sorted(model)
    assert len(counts) == len(model)
    assert all(counts.get(i) == model.get(i, 0) for i in set(inodes))
    assert (max(model) in counts) and (0 not in counts)
    for ino, n in list(model.items()):
        assert counts.forget(ino, n) == 0
    assert list(counts) == [] and not counts._pages and not counts._over


def test_a_run_of_inodes_costs_a_few_bytes_each() -> None:
    counts = LookupCounts()
    for ino in range(1000, 1000 + 100 * PAGE):
        counts.add(ino)
    assert len(counts._pages) == 101  # the run straddles one more page
    assert counts.get(999) == 0 and counts.get(1000) == 1
    for ino in range(1000, 1000 + 100 * PAGE):
        counts.forget(ino, 1)
    assert not counts._pages
