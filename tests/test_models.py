"""Models: shapes and gradients, blocks against a straightforward recomputation, save/load, tiled loss."""

import contextlib
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctxpar.kernels.levels import level_matrix
from ctxpar.models import CausalLM, ModelConfig, ShortConv, load_pretrained, save_pretrained, token_nll, token_stats
from ctxpar.models import mixers, offload
from ctxpar.train.parallel import setup
from tests.distributed import run_distributed

T = 24


def tiny(arch, **kw):
    cfg = dict(arch=arch, vocab_size=37, d_model=32, n_layers=2, n_heads=4, head_dim=16, state_dim=8,
               n_groups=1 if arch == "mamba2" else 2, max_seq_len=64, mlp_hidden=48)
    return ModelConfig(**{**cfg, **kw})


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_forward_backward_shapes(arch):
    torch.manual_seed(0)
    model = CausalLM(tiny(arch))
    ids = torch.randint(0, 37, (2, T))
    hidden = model(ids)
    assert hidden.shape == (2, T, 32)
    total, count = token_nll(model, hidden, ids, tile=7)
    (total / count).backward()
    assert count.item() == 2 * T
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tiled_loss_equals_full_cross_entropy():
    torch.manual_seed(1)
    model = CausalLM(tiny("mamba2"))
    ids = torch.randint(0, 37, (2, T))
    labels = ids.clone()
    labels[:, ::3] = -100
    hidden = model(ids)
    total, count = token_nll(model, hidden, labels, tile=5)
    full = F.cross_entropy(model.logits(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(total / count, full)
    nll, correct = token_stats(model, hidden, labels, tile=5)
    torch.testing.assert_close(nll[labels != -100].mean(), full)
    assert not correct[labels == -100].any()


def _naive_conv(x, weight, bias):
    """y[t] = bias + sum_j w[j] x[t - (W-1) + j], one tap at a time."""
    W = weight.shape[-1]
    y = bias.expand_as(x).clone()
    for j in range(W):
        shift = W - 1 - j
        y[:, shift:] += weight[:, 0, j] * x[:, : x.shape[1] - shift]
    return F.silu(y)


def _lam(mixer, u):
    logits = (u @ mixer.levels.proj.weight.t()).unflatten(-1, (mixer.cfg.n_heads, -1))
    return F.softplus(mixer.levels.gain * logits)


def _gated_norm(norm, y, z, group):
    x = (y * F.silu(z)).unflatten(-1, (-1, group))
    return (x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()).flatten(-2) * norm.weight


def _decay(mixer, dt):
    step = F.softplus(dt + mixer.dt_bias)
    return -step * mixer.A_log.exp(), step


def naive_mamba2(mixer, u):
    """o_t = sum_{s<=t} lambda_t[level] exp(G_t - G_s) (C_t . B_s) (dt_s x_s): the formula, O(T^2)."""
    cfg = mixer.cfg
    H, P, N = cfg.n_heads, cfg.head_dim, cfg.state_dim
    z, x, b, c, dt = (u @ mixer.in_proj.weight.t()).split(mixer.sizes, dim=-1)
    x, b, c = _naive_conv(torch.cat([x, b, c], -1), mixer.conv.weight, mixer.conv.bias).split(mixer.sizes[1:4], -1)
    g, step = _decay(mixer, dt)
    x = x.unflatten(-1, (H, P))
    lam = _lam(mixer, u)
    G = g.cumsum(1)
    lv = level_matrix(torch.arange(u.shape[1]))
    causal = torch.ones(u.shape[1], u.shape[1]).tril().bool()
    y = torch.zeros_like(x)
    for h in range(H):
        scores = (c @ b.transpose(1, 2)) * torch.exp(G[:, :, h, None] - G[:, None, :, h])
        weights = torch.gather(lam[:, :, h], 2, lv.expand(u.shape[0], -1, -1)) * scores * causal
        y[:, :, h] = weights @ (x[:, :, h] * step[:, :, h, None])
    y = y + x * mixer.D[:, None]
    return _gated_norm(mixer.norm, y.flatten(-2), z, P) @ mixer.out_proj.weight.t()


def naive_gdn(mixer, u):
    """o_t = K^-1/2 sum_{s<=t} lambda_t[level] q_t^T A_t ... A_{s+1} k_s beta_s v_s, one pair at a time."""
    cfg = mixer.cfg
    H, V, Hk, K = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.state_dim
    q, k, v = _naive_conv(u @ mixer.qkv.weight.t(), mixer.conv.weight, mixer.conv.bias).split(mixer.sizes, -1)
    dt, beta, gate = (u @ mixer.gates.weight.t()).split([H, H, H * V], -1)
    q = F.normalize(q.unflatten(-1, (Hk, K)), dim=-1).repeat_interleave(H // Hk, 2)
    k = F.normalize(k.unflatten(-1, (Hk, K)), dim=-1).repeat_interleave(H // Hk, 2)
    v, beta, lam = v.unflatten(-1, (H, V)), beta.sigmoid(), _lam(mixer, u)
    g, _ = _decay(mixer, dt)
    B, T_ = u.shape[:2]
    o = u.new_zeros(B, T_, H, V)
    eye = torch.eye(K, dtype=u.dtype)
    for bi in range(B):
        for h in range(H):
            for t in range(T_):
                carry = eye  # A_t ... A_{s+1}
                for s in range(t, -1, -1):
                    lvl = (t ^ s).bit_length()
                    o[bi, t, h] += lam[bi, t, h, lvl] * (q[bi, t, h] @ carry @ k[bi, s, h]) * beta[bi, s, h] * v[bi, s, h]
                    a = g[bi, s, h].exp() * (eye - beta[bi, s, h] * torch.outer(k[bi, s, h], k[bi, s, h]))
                    carry = carry @ a
    o = o * K**-0.5
    return _gated_norm(mixer.norm, o.flatten(-2), gate, V) @ mixer.out_proj.weight.t()


@pytest.mark.parametrize("arch,naive", [("mamba2", naive_mamba2), ("gdn", naive_gdn)])
def test_block_matches_naive_recomputation(arch, naive):
    torch.manual_seed(2)
    mixer = CausalLM(tiny(arch, lambda_init_std=0.5)).layers[0].mixer.double()
    u = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mixer(u), naive(mixer, u), rtol=1e-7, atol=1e-9)


def test_short_conv_matches_causal_conv1d():
    """ShortConv's shifted products against F.conv1d with W - 1 zeros in front: outputs and every
    gradient (F.conv1d is causal here by construction, so this also checks causality)."""
    conv = ShortConv(3, 4).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=3).transpose(1, 2)
    dy = torch.randn_like(ref)
    leaves = [x, conv.weight, conv.bias]
    for got, want in zip(torch.autograd.grad(conv(x), leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(3)
    model = CausalLM(tiny(arch))
    ids = torch.randint(0, 37, (1, T))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_load_at_longer_context_keeps_trained_levels(tmp_path):
    torch.manual_seed(4)
    model = CausalLM(tiny("mamba2", max_seq_len=16))
    save_pretrained(model, tmp_path)
    longer = load_pretrained(tmp_path, max_seq_len=256)
    old, new = model.layers[0].mixer.levels, longer.layers[0].mixer.levels
    L = model.cfg.num_levels
    assert longer.cfg.num_levels == 9 and L == 5
    torch.testing.assert_close(new.gain[:, :L], old.gain)
    torch.testing.assert_close(new.proj.weight.view(4, 9, -1)[:, :L], old.proj.weight.view(4, L, -1))
    # The first L levels are all a 16-token prefix uses, so its output is unchanged.
    ids = torch.randint(0, 37, (1, 16))
    torch.testing.assert_close(longer(ids), model(ids))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n_groups"):
        tiny("mamba2", n_groups=3)
    with pytest.raises(ValueError, match="expand"):
        tiny("mamba2", head_dim=8)


# --- token-tiled blocks ---------------------------------------------------------------------------


def _rms(norm, x):
    return x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight


def naive_block(block, x, naive_mixer):
    """x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(x)): the pre-norm block as formulas."""
    x = x + naive_mixer(block.mixer, _rms(block.mixer_norm, x))
    gate, up = (_rms(block.mlp_norm, x) @ block.mlp.gate_up.weight.t()).chunk(2, -1)
    return x + (F.silu(gate) * up) @ block.mlp.down.weight.t()


def _outputs_and_grads(run, params, x):
    """run(x), and the gradients of a fixed random projection of it w.r.t. x and the parameters."""
    out = run(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return out, torch.autograd.grad((out * w).sum(), [x, *params])


@pytest.mark.parametrize("arch,naive", [("mamba2", naive_mamba2), ("gdn", naive_gdn)])
def test_tiled_checkpointed_block_matches_naive(arch, naive):
    """Tiles of 5 over 12 tokens (uneven), recomputed inside a checkpointed block as CausalLM runs
    it: the same outputs and gradients as the formulas, in float64."""
    torch.manual_seed(5)
    block = CausalLM(tiny(arch, lambda_init_std=0.5)).layers[0].double()
    params = list(block.parameters())
    x = torch.randn(2, 12, 32, dtype=torch.float64, requires_grad=True)
    out, grads = _outputs_and_grads(lambda x: checkpoint(block, x, None, 5, use_reentrant=False), params, x)
    ref, ref_grads = _outputs_and_grads(lambda x: naive_block(block, x, naive), params, x)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_tiled_block_under_bf16_autocast_matches_plain_block():
    """With bf16 autocast (as the trainer runs), tiles change only the rounding: the same output,
    and weight gradients summed from per-tile bf16 products within two bf16 steps."""
    torch.manual_seed(6)
    block = CausalLM(tiny("mamba2", lambda_init_std=0.5, d_model=64, head_dim=32, mlp_hidden=160)).layers[0]
    params = list(block.parameters())
    x = torch.randn(1, 40, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _outputs_and_grads(lambda x: checkpoint(block, x, None, 16, use_reentrant=False), params, x)
        ref, ref_grads = _outputs_and_grads(block, params, x)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=2**-7 * r.abs().max().item())


def test_lm_token_tiles_change_nothing():
    """The LM with activation checkpointing and token tiles of 7: the plain LM's loss and gradients."""
    torch.manual_seed(7)
    model = CausalLM(tiny("mamba2")).double()
    ids = torch.randint(0, 37, (1, 30))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing, model.token_tile = checkpointing, 7
        total, count = token_nll(model, model(ids), ids, tile=16)
        results.append([total / count, *torch.autograd.grad(total / count, list(model.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_compiled_stages_change_nothing_and_compile_once(arch):
    """compile_per_token (AOTAutograd here; inductor on the GPU) under checkpointed blocks and
    uneven token tiles: the eager model's loss and gradients, and the number of graphs dynamo
    builds does not grow with the number of blocks (every block shares the compiled stages)."""
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = CausalLM(tiny(arch, n_layers=layers, lambda_init_std=0.5))
        ids, labels = torch.randint(0, 37, (2, 30)), torch.randint(0, 37, (2, 30))
        results = []
        for compiled in (False, True):
            if compiled:
                model.compile_per_token(backend="aot_eager")
            model.activation_checkpointing, model.token_tile = True, 7
            total, count = token_nll(model, model(ids), labels, tile=11)
            results.append([total / count, *torch.autograd.grad(total / count, list(model.parameters()))])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        graphs.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs[0] == graphs[1], graphs


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_inductor_stages_match_eager_on_gpu(arch):
    """The stages inductor compiles (bf16 autocast, Triton backend, checkpointed uneven token
    tiles) against the same model in float32: the loss and the gradient (all parameters as one
    vector) no further from it than the eager bf16 model's (bf16 rounds in other places once
    fused; a per-parameter bound was flaky on the GPU: small per-head vectors, whose gradients
    sum over all tokens, carry most of the noise). Two models of two lengths in one process, as
    a benchmark meets them."""
    for length in (4096, 6144):
        cfg = tiny(arch, d_model=256, n_layers=2, n_heads=8, head_dim=64, state_dim=64, mlp_hidden=512,
                   max_seq_len=8192, lambda_init_std=0.5, backend="triton")
        model = CausalLM(cfg).cuda()
        model.activation_checkpointing, model.token_tile = True, 1536
        ids, labels = (torch.randint(0, 37, (1, length), device="cuda") for _ in range(2))
        results = []
        for compiled, bf16 in ((False, False), (False, True), (True, True)):
            if compiled:
                model.compile_per_token()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                total, count = token_nll(model, model(ids), labels, tile=1024)
            results.append([total / count, *torch.autograd.grad(total / count, list(model.parameters()))])
        (ref_loss, ref), (eager_loss, eager), (loss, grad) = (
            (r[0].float(), torch.cat([g.float().flatten() for g in r[1:]])) for r in results)
        assert torch.isfinite(grad).all()
        err = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
        assert err(loss, ref_loss) <= 2 * err(eager_loss, ref_loss) + 1e-3, length
        assert err(grad, ref) <= 2 * err(eager, ref) + 1e-3, (length, err(grad, ref), err(eager, ref))


def _saved_bytes(block, x, tile):
    """Bytes autograd saves for backward in one forward of ``block`` (each storage once): inside a
    checkpointed block, what its recomputation holds until its backward. The tiles' checkpoints
    save their inputs, so the tensors handed between the stages count too."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, None, tile)
    return sum(storages.values())


def test_token_tiles_cut_what_a_block_saves(monkeypatch):
    """The 1M recipe's widths, saved bytes per token (the slope from 256 to 512 tokens, so the
    weights' bf16 copies cancel): untiled ~120 KB (float32 norm intermediates, the SwiGLU's
    [T, 2 x 2816], ...); in tiles of 128 ~26 KB: the residual input, the conv's input and output,
    z, v and the op's output. The op is a per-token stand-in here, its own internals left out."""
    monkeypatch.setattr(mixers, "log_linear_mamba2", lambda q, k, v, g, lam, **_: (v * lam[..., :1].to(v.dtype), None))
    cfg = ModelConfig(vocab_size=64, d_model=1024, n_layers=1, n_heads=32, head_dim=64, state_dim=128,
                      mlp_hidden=2816, max_seq_len=2**20)
    torch.manual_seed(8)
    block = CausalLM(cfg).layers[0]
    xs = [torch.randn(1, T, 1024, requires_grad=True) for T in (256, 512)]
    per_token = {tile: (_saved_bytes(block, xs[1], tile) - _saved_bytes(block, xs[0], tile)) / 256 for tile in (None, 128)}
    print(f"saved per token: untiled {per_token[None] / 1e3:.1f} KB, tiled {per_token[128] / 1e3:.1f} KB")
    assert per_token[None] > 100e3
    assert per_token[128] < 30e3


def test_offloaded_checkpoints_are_the_block_inputs_and_change_nothing(monkeypatch):
    """offload_checkpoints parks exactly each checkpointed block's input (the residual stream), and
    nothing else; the original is not kept (here: layer 0's input, whose copy alone outlives the
    forward); every block's input but the last's is on its way back before backward asks for it;
    loss and gradients stay the same."""
    torch.manual_seed(10)
    model = CausalLM(tiny("mamba2"))
    model.activation_checkpointing, model.token_tile = True, 7
    ids = torch.randint(0, 37, (1, 30))
    packed, handed_out = [], []
    pack, unpack = offload.HostOffload._pack, offload.HostOffload._unpack

    def spy_pack(self, t):
        packed.append((tuple(t.shape), t.dtype))
        return pack(self, t)

    def spy_unpack(packed):
        host_offload, j = packed
        handed_out.append((j, host_offload.parked[j].back is not None))  # already on its way?
        return unpack(packed)

    monkeypatch.setattr(offload.HostOffload, "_pack", spy_pack)
    monkeypatch.setattr(offload.HostOffload, "_unpack", staticmethod(spy_unpack))
    results, kept = [], []
    for offloaded in (False, True):
        model.offload_checkpoints = offloaded
        first = []
        hook = model.embed.register_forward_hook(lambda m, i, out: first.append(weakref.ref(out.untyped_storage())))
        total, count = token_nll(model, model(ids), ids, tile=16)
        hook.remove()
        kept.append(first[0]() is not None)
        results.append([total / count, *torch.autograd.grad(total / count, list(model.parameters()))])
    layers = model.cfg.n_layers
    assert packed == [((1, 30, 32), torch.float32)] * layers
    assert handed_out == [(j, j < layers - 1) for j in reversed(range(layers))]
    assert kept == [True, False]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_host_offload_survives_reused_memory_on_gpu():
    """The copies run on a side stream: a saved tensor whose memory the compute stream reuses
    right after its forward (freed, reallocated, overwritten) still comes back with its values,
    in pinned host memory meanwhile, and the gradients are those without offload."""
    xs = [torch.randn(4096, 4096, device="cuda", requires_grad=True) for _ in range(3)]
    grads = []
    for offloaded in (False, True):
        host_offload = offload.HostOffload()
        y = torch.zeros((), device="cuda")
        for x in xs:
            a = x * 1.5  # saves nothing; under the hooks, sin saves a, which dies right after
            with host_offload.hooks() if offloaded else contextlib.nullcontext():
                h = a.sin()
            del a
            torch.empty_like(x).fill_(float("nan"))  # takes a's memory, where the allocator allows
            y = y + h.sum()
        if offloaded:
            assert all(p.host.is_pinned() and p.host.device.type == "cpu" for p in host_offload.parked)
        grads.append(torch.autograd.grad(y, xs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cp_tiles_match_one_process(arch):
    """On each of 2 ranks: the checkpointed, token-tiled LM on this rank's half of the sequence
    (CP = 2), eager and then with its per-token stages compiled (AOTAutograd; the halo exchange
    stays outside them), summed over the ranks, has the plain LM's loss and gradients on the
    whole sequence. Through ``autograd.grad(loss, params)``, which runs only the calls with a path
    to a parameter: the last rank's halo exchange reaches one only through its anchor
    (collectives.send_recv); without it that rank skipped the call and left its peer waiting."""
    layout = setup(2)
    torch.manual_seed(11)
    model = CausalLM(tiny(arch, max_seq_len=128))
    ids = torch.randint(0, 37, (1, 128))  # CP slices are whole 64-token chunks
    results = []
    runs = ((ids, None, False, False), (layout.split(ids), layout.cp_context(), True, False),
            (layout.split(ids), layout.cp_context(), True, True))
    for inputs, cp, checkpointing, compiled in runs:
        if compiled:
            model.compile_per_token(backend="aot_eager")
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing, model.token_tile = checkpointing, 24
        total, _ = token_nll(model, model(inputs, cp), inputs)
        results.append([total.detach(), *torch.autograd.grad(total, list(model.parameters()))])
    ref, *split = results
    for got in split:
        for a, b in zip(got, ref):
            dist.all_reduce(a)  # float32 sums in another order: near-zero entries differ by rounding
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_token_tiles_under_context_parallelism(arch):
    run_distributed(_cp_tiles_match_one_process, 2, arch)
