"""The checks shared by the Triton kernel tests: a backend against the float64 oracles, on
float64 inputs or on half-precision ones.

Outputs, final Fenwick state and every gradient (q, k, v, g, beta when given, level_scales,
initial state) on fresh random output and state gradients.
"""

import torch

from ctxpar.kernels import reference
from ctxpar.kernels.state import FenwickState
from tests.factories import rel_err

NAMES = ["q", "k", "v", "g", "beta", "level_scales", "initial_state"]


def reference_run(q, k, v, g, beta, lam, spans, init, final):
    """The materialized oracle (the token recurrence when a state goes in or out); q, k with Hk heads."""
    groups = v.shape[2] // q.shape[2]
    qe, ke = q.repeat_interleave(groups, 2), k.repeat_interleave(groups, 2)
    if init is None and not final:
        return reference.materialized(qe, ke, v, g, beta, lam, spans), None
    return reference.recurrent(qe, ke, v, g, beta, lam, spans, init, final)


def check_against_reference(chunked, inputs, spans, positions, final, tol=1e-5, **kwargs):
    """inputs: float64 q, k, v, g, beta (None for Mamba-2), lam; positions: initial state or None."""
    q, k, v = inputs[:3]
    init = None
    if positions is not None:
        nbits = max(p.bit_length() for p in positions)
        buckets = torch.randn(len(spans), v.shape[2], nbits, k.shape[3], v.shape[3], dtype=v.dtype, device=v.device)
        init = FenwickState((buckets * 0.3).requires_grad_(), positions)
    with_state = init is not None and init.buckets.numel() > 0  # states at position 0 have no buckets
    names = [n for n, x in zip(NAMES, inputs) if x is not None] + (["initial_state"] if with_state else [])
    leaves = [x.requires_grad_() for x in inputs if x is not None] + ([init.buckets] if with_state else [])
    do = torch.randn_like(v)

    def loss_of(o, state):
        loss = (o * do).sum()
        return loss + (state.buckets * d_state).sum() if final else loss

    ref_o, ref_state = reference_run(*inputs, spans, init, final)
    d_state = torch.randn_like(ref_state.buckets) if final else None
    ref_grads = torch.autograd.grad(loss_of(ref_o, ref_state), leaves)

    o, state = chunked(*inputs, spans, init, final, **kwargs)
    assert not torch.isnan(o).any()
    assert rel_err(o, ref_o) < tol
    if final:
        assert state.positions == ref_state.positions
        assert rel_err(state.buckets, ref_state.buckets) < tol
    grads = torch.autograd.grad(loss_of(o, state), leaves)
    for name, a, b in zip(names, grads, ref_grads):
        assert not torch.isnan(a).any(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    if with_state:  # buckets of unset bits receive zero gradient
        assert (grads[-1].transpose(1, 2)[~init.live_mask()] == 0).all()


def half_precision_errors(chunked, inputs, spans, positions, final, dtype, **kwargs):
    """inputs: float64 q, k, v, g, beta (None for Mamba-2), lam, rounded to ``dtype`` (g and an
    initial state's buckets float32) -> {"o", "state" (if final), then each gradient's name:
    relative error against the float64 oracle on the rounded inputs}. Asserts that outputs and
    gradients come back in the inputs' dtypes. Random draws (state, output gradients) come from
    torch's global generator."""
    half = [None if x is None else x.float() if i == 3 else x.to(dtype) for i, x in enumerate(inputs)]
    names = [n for n, x in zip(NAMES, half) if x is not None]
    leaves = [x.requires_grad_() for x in half if x is not None]
    if positions is not None:
        v, k = inputs[2], inputs[1]
        nbits = max(p.bit_length() for p in positions)
        shape = (len(spans), v.shape[2], nbits, k.shape[3], v.shape[3])
        leaves.append((torch.randn(shape, device=v.device) * 0.3).requires_grad_())
        names.append("initial_state")
    exact = [x.detach().double().requires_grad_() for x in leaves]

    def call(fn, xs, **kw):
        it = iter(xs)
        args = [None if x is None else next(it) for x in half]
        return fn(*args, spans, None if positions is None else FenwickState(next(it), positions), final, **kw)

    o, state = call(chunked, leaves, **kwargs)
    assert o.dtype == dtype
    ref_o, ref_state = call(reference_run, exact)
    errors = {"o": rel_err(o.double(), ref_o)}
    if final:
        errors["state"] = rel_err(state.buckets.double(), ref_state.buckets)
    do = torch.randn_like(ref_o)
    d_state = torch.randn_like(ref_state.buckets) if final else None

    def loss_of(o, state):
        loss = (o.double() * do).sum()
        return loss + (state.buckets.double() * d_state).sum() if final else loss

    grads = torch.autograd.grad(loss_of(o, state), leaves)
    assert [x.dtype for x in grads] == [x.dtype for x in leaves]
    for name, a, b in zip(names, grads, torch.autograd.grad(loss_of(ref_o, ref_state), exact)):
        errors[name] = rel_err(a.double(), b)
    return errors


def check_half_precision(chunked, inputs, spans, positions, final, dtype, tol_o, tol_grad, **kwargs):
    """half_precision_errors within tol_o (outputs, final state) and tol_grad (gradients)."""
    errors = half_precision_errors(chunked, inputs, spans, positions, final, dtype, **kwargs)
    for name, err in errors.items():
        assert err < (tol_o if name in ("o", "state") else tol_grad), (name, err)
