"""The torch backend and the two oracles agree with each other and with plain Mamba-2 / GDN."""

import random

import pytest
import torch
from factories import attention_inputs, rel_err

from ctxpar import FenwickState, log_linear_gdn, log_linear_gdn_step, log_linear_mamba2, log_linear_mamba2_step
from ctxpar.kernels import reference, torch_chunked
from ctxpar.kernels.inputs import canonicalize
from ctxpar.kernels.levels import num_levels

VARIANTS = ["mamba2", "gdn"]


def run(variant, inputs, **kwargs):
    q, k, v, g, beta, lam = inputs
    if variant == "gdn":
        return log_linear_gdn(q, k, v, g, beta, lam, **kwargs)
    return log_linear_mamba2(q, k, v, g, lam, **kwargs)


def canonical(variant, inputs, state=None, cu_seqlens=None):
    q, k, v, g, beta, lam = inputs
    scale = (lambda d: d**-0.5) if variant == "gdn" else (lambda d: 1.0)
    return canonicalize(q, k, v, g, beta, lam, None, state, cu_seqlens, default_scale=scale)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 127, 200, 1000])
@pytest.mark.parametrize("grouped", [False, True])
def test_materialized_recurrent_and_chunked_agree(variant, T, grouped):
    H = 2
    inputs = attention_inputs(2 if T < 500 else 1, T, H, 8, 4, Hk=1 if grouped else H, gdn=variant == "gdn")
    c = canonical(variant, inputs)
    args = (c.q, c.k, c.v, c.g, c.beta, c.lam, c.spans)
    o_mat = reference.materialized(*args)
    o_rec, s_rec = reference.recurrent(*args, None, True)
    o_chk, s_chk = torch_chunked.chunked(*args, None, True)
    assert rel_err(o_rec, o_mat) < 1e-10
    assert rel_err(o_chk, o_mat) < 1e-10
    assert s_chk.positions == s_rec.positions == tuple(T for _ in c.spans)
    assert rel_err(s_chk.buckets, s_rec.buckets) < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [2, 4, 16])
def test_small_chunks_exercise_many_tree_heights(variant, chunk):
    """Small chunks put ~log2(T / chunk) heights in the tree at a cheap T."""
    inputs = attention_inputs(2, 301, 2, 4, 3, gdn=variant == "gdn")
    c = canonical(variant, inputs)
    args = (c.q, c.k, c.v, c.g, c.beta, c.lam, c.spans)
    o_rec, s_rec = reference.recurrent(*args, None, True)
    o_chk, s_chk = torch_chunked.chunked(*args, None, True, chunk_size=chunk)
    assert rel_err(o_chk, o_rec) < 1e-10
    assert rel_err(s_chk.buckets, s_rec.buckets) < 1e-10


def _plain_mamba2(q, k, v, g, scale):
    """Mamba-2 / simple GLA with one state, written independently of ctxpar."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = g[:, t].exp()[..., None, None] * S + k[:, t][..., None] * v[:, t][..., None, :]
        out.append(scale * (q[:, t][..., None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lambda_one_is_plain_mamba2_or_gated_delta_rule(variant):
    q, k, v, g, beta, lam = attention_inputs(2, 150, 3, 8, 5, gdn=variant == "gdn")
    lam = torch.ones_like(lam)
    if variant == "gdn":
        o_plain = _plain_gdn(q, k, v, g, beta, q.shape[-1] ** -0.5)
    else:
        o_plain = _plain_mamba2(q, k, v, g, 1.0)
    for backend in ("torch", "reference"):
        o, _ = run(variant, (q, k, v, g, beta, lam), backend=backend)
        assert rel_err(o, o_plain) < 1e-10, backend


def _plain_gdn(q, k, v, g, beta, scale):
    """The gated delta rule S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, one state."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        kt, bt, at = k[:, t], beta[:, t][..., None, None], g[:, t].exp()[..., None, None]
        S = at * (S - bt * kt[..., None] * (kt[..., None, :] @ S)) + bt * kt[..., None] * v[:, t][..., None, :]
        out.append(scale * (q[:, t][..., None, :] @ S).squeeze(-2))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_packed_documents_equal_separate_runs(variant, backend):
    lengths = [random.randint(1, 150) for _ in range(4)] + [64, 1]
    inputs = attention_inputs(1, sum(lengths), 2, 4, 3, gdn=variant == "gdn", levels=num_levels(150))
    cu = torch.tensor([0] + lengths).cumsum(0)
    o, state = run(variant, inputs, cu_seqlens=cu, output_final_state=True, backend=backend)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = [None if x is None else x[:, a:b] for x in inputs]
        o_doc, s_doc = run(variant, doc, output_final_state=True, backend=backend)
        assert rel_err(o[:, a:b], o_doc) < 1e-12
        assert state.positions[n] == b - a
        live = state.buckets[n, :, : s_doc.buckets.shape[2]]
        assert rel_err(live, s_doc.buckets[0]) < 1e-12


def _grads(variant, inputs, state, backend, weights=None):
    leaves = [x for x in inputs if x is not None] + ([state.buckets] if state is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    o, final = run(variant, inputs, initial_state=state, output_final_state=True, backend=backend)
    if weights is None:
        weights = torch.randn_like(o), torch.randn_like(final.buckets)
    loss = (o * weights[0]).sum() + (final.buckets * weights[1]).sum()
    return o.detach(), final.buckets.detach(), torch.autograd.grad(loss, leaves), weights


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T, t0", [(70, 0), (45, 13), (130, 64), (9, 100)])
def test_gradients_of_every_input_match_the_reference(variant, T, t0):
    H, K, V = 2, 4, 3
    inputs = attention_inputs(2, T, H, K, V, Hk=1, gdn=variant == "gdn", levels=num_levels(T + t0))
    state = None
    if t0:
        state = FenwickState(torch.randn(2, H, t0.bit_length(), K, V, dtype=torch.float64), (t0, t0))
    o_t, s_t, g_t, w = _grads(variant, inputs, state, "torch")
    inputs = [None if x is None else x.detach() for x in inputs]
    state = None if state is None else state.detach()
    o_r, s_r, g_r, _ = _grads(variant, inputs, state, "reference", w)
    assert rel_err(o_t, o_r) < 1e-10 and rel_err(s_t, s_r) < 1e-10
    for a, b in zip(g_t, g_r):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_on_tiny_shapes(variant):
    inputs = attention_inputs(1, 11, 2, 3, 2, gdn=variant == "gdn", levels=num_levels(16))
    state = FenwickState(torch.randn(1, 2, 3, 3, 2, dtype=torch.float64), (5,))
    leaves = [x.requires_grad_(True) for x in inputs if x is not None] + [state.buckets.requires_grad_(True)]

    def fn(*xs):
        xs = list(xs)
        buckets = xs.pop()
        full = [xs.pop(0) if x is not None else None for x in inputs]
        o, s = run(variant, full, initial_state=FenwickState(buckets, (5,)), output_final_state=True, backend="torch")
        return o, s.buckets

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_continuation_from_the_returned_state(variant, backend):
    """[0, t0) then [t0, T) from the returned state equals [0, T), gradients flowing into the state."""
    T = 160
    inputs = attention_inputs(2, T, 2, 4, 3, gdn=variant == "gdn")
    o_full, s_full = run(variant, inputs, output_final_state=True, backend=backend)
    cuts = [1, 2, 3, 31, 63, 64, 65, 100, 128, 159] + [random.randrange(1, T) for _ in range(3)]
    for t0 in cuts:
        head = [None if x is None else x[:, :t0] for x in inputs]
        tail = [None if x is None else x[:, t0:] for x in inputs]
        o1, s1 = run(variant, head, output_final_state=True, backend=backend)
        o2, s2 = run(variant, tail, initial_state=s1, output_final_state=True, backend=backend)
        assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-10, t0
        assert rel_err(s2.buckets, s_full.buckets) < 1e-10, t0
    # the state carries gradient back to the first part's inputs
    v = inputs[2].clone().requires_grad_(True)
    head = [x[:, :t0] if x is not None else None for x in inputs]
    head[2] = v[:, :t0]
    _, s1 = run(variant, head, output_final_state=True, backend=backend)
    tail = [None if x is None else x[:, t0:] for x in inputs]
    o2, _ = run(variant, tail, initial_state=s1, backend=backend)
    (grad,) = torch.autograd.grad(o2.square().sum(), v)
    assert grad[:, :t0].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_rows_may_start_at_different_positions(variant):
    inputs = attention_inputs(3, 40, 2, 4, 3, gdn=variant == "gdn", levels=num_levels(140))
    state = FenwickState(torch.randn(3, 2, 7, 4, 3, dtype=torch.float64), (0, 37, 100))
    o_t, s_t = run(variant, inputs, initial_state=state, output_final_state=True, backend="torch")
    o_r, s_r = run(variant, inputs, initial_state=state, output_final_state=True, backend="reference")
    assert rel_err(o_t, o_r) < 1e-10 and rel_err(s_t.buckets, s_r.buckets) < 1e-10
    assert s_t.positions == (40, 77, 140)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_steps_reproduce_the_full_forward(variant):
    T = 37
    q, k, v, g, beta, lam = attention_inputs(2, T, 4, 4, 3, Hk=2, gdn=variant == "gdn")
    o_full, s_full = run(variant, (q, k, v, g, beta, lam), output_final_state=True, backend="torch")
    state, outs = None, []
    for t in range(T):
        if variant == "gdn":
            o, state = log_linear_gdn_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], lam[:, t], state)
        else:
            o, state = log_linear_mamba2_step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t], state)
        outs.append(o)
    assert rel_err(torch.stack(outs, 1), o_full) < 1e-10
    assert rel_err(state.buckets, s_full.buckets) < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_inputs_compute_in_float32(variant):
    inputs = attention_inputs(1, 90, 2, 16, 16, gdn=variant == "gdn", dtype=torch.float32)
    o32, _ = run(variant, inputs, backend="torch")
    low = [None if x is None else (x if x is inputs[3] else x.bfloat16()) for x in inputs]
    o16, _ = run(variant, low, backend="torch")
    assert o16.dtype == torch.bfloat16
    assert rel_err(o16.float(), o32) < 2e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_without_autograd(variant):
    inputs = attention_inputs(1, 150, 2, 4, 3, gdn=variant == "gdn")
    with torch.no_grad():
        o, _ = run(variant, inputs, backend="torch")
    assert rel_err(o, run(variant, inputs, backend="reference")[0]) < 1e-10


def test_auto_backend_on_cpu_is_the_torch_backend():
    inputs = attention_inputs(1, 70, 2, 4, 3)
    o_auto, _ = run("mamba2", inputs)
    o_ref, _ = run("mamba2", inputs, backend="reference")
    assert rel_err(o_auto, o_ref) < 1e-10


def saved_for_backward_bytes(variant, T):
    """Bytes autograd keeps between forward and backward (each storage counted once)."""
    inputs = attention_inputs(1, T, 2, 16, 16, gdn=variant == "gdn", dtype=torch.float32)
    inputs = [None if x is None else x.requires_grad_(True) for x in inputs]
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run(variant, inputs, backend="torch")
    return sum(storages.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_activations_grow_linearly_in_T(variant):
    """No T x T tensor and no T x log T activations: bytes per token stay flat from 1K to 8K."""
    small, large = (saved_for_backward_bytes(variant, T) / T for T in (1024, 8192))
    assert large <= 1.05 * small, (small, large)
