import random

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from ctxpar.kernels.levels import bucket_range, level_matrix, level_of, live_bits, num_levels, read_levels


def brute_levels(t):
    """Levels a query at t indexes into (0 .. its highest level), counted pair by pair."""
    return 1 + max((t ^ s).bit_length() for s in range(t + 1))


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 1000, 1024, 1025])
def test_num_levels_matches_pairs(length):
    assert num_levels(length) == max(brute_levels(t) for t in range(length))


def test_num_levels_at_a_million():
    assert num_levels(2**20) == 21
    assert num_levels(2**20 + 1) == 22
    with pytest.raises(ValueError):
        num_levels(-1)


def test_level_of_ints_and_tensors_agree():
    pairs = [(random.randrange(1 << 40), 0) for _ in range(200)]
    pairs = [(t, random.randrange(t + 1)) for t, _ in pairs]
    t = torch.tensor([p[0] for p in pairs])
    s = torch.tensor([p[1] for p in pairs])
    assert level_of(t, s).tolist() == [(a ^ b).bit_length() for a, b in pairs]
    assert all(level_of(a, b) == (a ^ b).bit_length() for a, b in pairs)
    with pytest.raises(ValueError):
        level_of(3, 5)


def test_level_matrix_diagonal_is_zero_and_symmetric_in_xor():
    n = 97
    m = level_matrix(torch.arange(n))
    assert (m.diagonal() == 0).all()
    assert m[n - 1, 0] == (n - 1).bit_length()


@pytest.mark.parametrize("position", [1, 2, 3, 6, 7, 8, 13, 64, 100, 1023, 1024, random.randrange(1, 1 << 20)])
def test_buckets_partition_the_prefix_by_level(position):
    """The buckets of the state after `position` tokens tile [0, position), and every source in the
    bucket of bit b has level b + 1 for the next query (t = position)."""
    covered = []
    for bit in live_bits(position):
        lo, hi = bucket_range(position, bit)
        assert hi - lo == 1 << bit
        covered += list(range(lo, hi)) if position < 5000 else [lo, hi - 1]
        for s in (lo, hi - 1):
            assert level_of(position, s) == bit + 1
    if position < 5000:
        assert sorted(covered) == list(range(position))
    with pytest.raises(ValueError):
        bucket_range(position, max(live_bits(position)) + 1)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(1, 1 << 21), n=st.integers(1, 5000), data=st.data())
def test_read_levels_are_the_levels_of_each_query(position, n, data):
    bit = data.draw(st.sampled_from(live_bits(position)))
    runs = read_levels(position, n, bit)
    levels = [level for a, e, level in runs for _ in range(a, e)]
    lo, hi = bucket_range(position, bit)  # every source of the bucket: the level of the pair (t, s)
    t = torch.arange(position, position + n)
    assert levels == level_of(t, lo).tolist() == level_of(t, hi - 1).tolist()
    assert [a for a, _, _ in runs] == [0] + [e for _, e, _ in runs[:-1]]
    assert len({level for _, _, level in runs}) == len(runs)
