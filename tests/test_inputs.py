"""Every malformed input raises a clear error: one test per rule."""

import pytest
import torch
from factories import attention_inputs

from ctxpar import FenwickState, log_linear_gdn, log_linear_mamba2


def mamba(inputs, **kw):
    q, k, v, g, _, lam = inputs
    return log_linear_mamba2(q, k, v, g, lam, **kw)


def gdn(inputs, **kw):
    return log_linear_gdn(*inputs, **kw)


@pytest.fixture
def inputs():
    return list(attention_inputs(1, 20, 4, 8, 4, Hk=2, gdn=True, dtype=torch.float32))


def replace(inputs, index, value):
    out = list(inputs)
    out[index] = value
    return out


def test_q_k_shapes_must_match(inputs):
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        gdn(replace(inputs, 1, inputs[1][..., :4]))


def test_wrong_rank(inputs):
    with pytest.raises(ValueError, match="v must have 4 dims"):
        gdn(replace(inputs, 2, inputs[2][0]))


def test_heads_must_divide(inputs):
    q, k = inputs[0], inputs[1]
    bad = replace(replace(inputs, 0, q[:, :, :1].repeat(1, 1, 3, 1)), 1, k[:, :, :1].repeat(1, 1, 3, 1))
    with pytest.raises(ValueError, match=r"must divide v heads"):
        gdn(bad)


def test_batch_and_length_must_agree(inputs):
    with pytest.raises(ValueError, match=r"q is \[B, T\]"):
        gdn(replace(replace(inputs, 0, inputs[0][:, :10]), 1, inputs[1][:, :10]))


def test_g_shape(inputs):
    with pytest.raises(ValueError, match="g must be"):
        gdn(replace(inputs, 3, inputs[3][..., :2]))


def test_beta_shape(inputs):
    with pytest.raises(ValueError, match="beta must be"):
        gdn(replace(inputs, 4, inputs[4][:, :5]))


def test_level_scales_shape(inputs):
    with pytest.raises(ValueError, match="level_scales must be"):
        gdn(replace(inputs, 5, inputs[5][:, :, :1]))


def test_empty_sequence(inputs):
    empty = [x[:, :0] for x in inputs]
    with pytest.raises(ValueError, match="empty"):
        gdn(empty)


def test_qkv_dtypes_must_agree(inputs):
    with pytest.raises(TypeError, match="share one float dtype"):
        gdn(replace(inputs, 2, inputs[2].double()))


def test_integer_inputs_are_refused(inputs):
    with pytest.raises(TypeError):
        gdn([x.long() if i < 3 else x for i, x in enumerate(inputs)])


def test_g_must_be_float32(inputs):
    with pytest.raises(TypeError, match="g must be float32"):
        gdn(replace(inputs, 3, inputs[3].bfloat16()))


def test_too_few_levels_names_the_number_needed(inputs):
    # 20 tokens need 1 + ceil(log2 20) = 6 levels
    with pytest.raises(ValueError, match="needs 6"):
        gdn(replace(inputs, 5, inputs[5][..., :5]))


def test_too_few_levels_counts_the_initial_position(inputs):
    state = FenwickState.zeros(1, 4, 8, 4, positions=(1000,))
    with pytest.raises(ValueError, match="1020 tokens needs 11"):
        gdn(inputs, initial_state=state)


def test_cu_seqlens_needs_batch_one():
    inputs = attention_inputs(2, 20, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="B must be 1"):
        mamba(inputs, cu_seqlens=torch.tensor([0, 10, 20]))


@pytest.mark.parametrize("cu", [[0, 10, 10, 20], [0, 15, 10, 20], [1, 20], [0, 19], [0]])
def test_cu_seqlens_must_increase_from_zero_to_T(inputs, cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        gdn(inputs, cu_seqlens=torch.tensor(cu))


def test_cu_seqlens_must_be_integer(inputs):
    with pytest.raises(ValueError, match="integer"):
        gdn(inputs, cu_seqlens=torch.tensor([0.0, 20.0]))


def test_initial_state_must_match_the_sequences(inputs):
    state = FenwickState.zeros(2, 4, 8, 4, positions=(3, 3))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        gdn(inputs, initial_state=state)


def test_initial_state_must_match_the_dims(inputs):
    state = FenwickState.zeros(1, 4, 8, 8, positions=(3,))
    with pytest.raises(ValueError, match="expected"):
        gdn(inputs, initial_state=state)


def test_initial_state_must_be_a_fenwick_state(inputs):
    with pytest.raises(TypeError, match="FenwickState"):
        gdn(inputs, initial_state=torch.zeros(1, 4, 8, 4))


def test_fenwick_state_needs_a_bucket_per_bit():
    with pytest.raises(ValueError, match="needs 3 buckets"):
        FenwickState(torch.zeros(1, 1, 2, 4, 4), (5,))


def test_mismatched_devices(inputs):
    meta = replace(inputs, 2, inputs[2].to("meta"))
    with pytest.raises(ValueError, match="one device"):
        gdn(meta)


@pytest.mark.parametrize("index, name", [(0, "q"), (2, "v"), (3, "g"), (5, "level_scales")])
def test_nan_never_passes(inputs, index, name):
    bad = inputs[index].clone()
    bad[0, 3].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        gdn(replace(inputs, index, bad))


def test_positive_log_decay_is_refused(inputs):
    with pytest.raises(ValueError, match="g must be <= 0"):
        gdn(replace(inputs, 3, inputs[3].abs() + 0.1))


def test_unknown_backend(inputs):
    with pytest.raises(ValueError, match="backend must be one of"):
        gdn(inputs, backend="cuda")
