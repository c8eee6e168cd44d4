"""Models: shapes and gradients, blocks against a straightforward recomputation, save/load, tiled loss."""

import pytest
import torch
import torch.nn.functional as F

from ctxpar.kernels.levels import level_matrix
from ctxpar.models import CausalLM, ModelConfig, load_pretrained, save_pretrained, token_nll, token_stats
from ctxpar.models.layers import causal_conv1d

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


def test_causal_conv_is_causal():
    x = torch.randn(1, 10, 3)
    w, b = torch.randn(3, 1, 4), torch.randn(3)
    y = causal_conv1d(x, w, b)
    x2 = x.clone()
    x2[:, 6:] += 1
    torch.testing.assert_close(causal_conv1d(x2, w, b)[:, :6], y[:, :6])


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
