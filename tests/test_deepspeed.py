"""DeepSpeed engine with ctxpar context parallelism: 4 CPU ranks, CP = 2 x DP = 2, ZeRO 0-3.

After one step the gradients and the updated parameters must equal a single-process reference:
the data-parallel mean of the full-sequence token-mean loss, differentiated in one process.
"""

import copy
import os

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed", reason="the [deepspeed] extra is not installed")

from tests.distributed import run_distributed  # noqa: E402

CP, DP, T, VOCAB = 2, 2, 128, 61
# Adam's first step is lr * g / (|g| + eps): a large eps keeps it a smooth function of the
# gradient, so float32 rounding in the gradient cannot flip tiny entries.
LR, EPS, CLIP = 1e-2, 1e-3, 0.05


def tiny_model():
    from ctxpar.models import CausalLM, ModelConfig

    torch.manual_seed(1234)  # every rank and the reference build the same weights
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, head_dim=32, state_dim=16,
                      max_seq_len=T, backend="torch")
    return CausalLM(cfg)


def reference_step(model, batches):
    """One AdamW step on the DP mean of each whole sequence's token-mean loss, in one process."""
    from ctxpar.integrations.deepspeed import split_batch
    from ctxpar.models import token_nll

    model = copy.deepcopy(model)
    loss = 0
    for ids in batches:
        ids, labels = split_batch(ids, 0, 1)
        nll, count = token_nll(model, model(ids), labels)
        loss = loss + nll / count / len(batches)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0).step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(engine):
    """Every parameter whole, in fp32 (ZeRO 1-3 keep fp32 masters; ZeRO 0 trains the fp32 module)."""
    get = deepspeed.utils.safe_get_full_fp32_param
    return {n.removeprefix("model."): (get(p) if get(p) is not None else p.detach()).clone()
            for n, p in engine.module.named_parameters()}


def engine_step(stage, batches, tmpdir):
    import torch.distributed as dist

    from ctxpar.integrations.deepspeed import cp_loss, setup_context_parallel, split_batch, zero3_loss_module

    cpx = setup_context_parallel(CP)
    config = cpx.deepspeed_config(
        {
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS, "weight_decay": 0.0, "torch_adam": True}},
            "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        },
        micro_batch=1,
    )
    model = zero3_loss_module(tiny_model())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=cpx.mpu)
    ids, labels = split_batch(batches[cpx.mesh.dp_rank], cpx.cp_rank, cpx.cp_size)
    loss = cp_loss(*engine(ids, labels, cp=cpx.context), cpx, engine.zero_optimization_stage())
    engine.backward(loss)
    grads = {n.removeprefix("model."): deepspeed.utils.safe_get_full_grad(p).clone()
             for n, p in engine.module.named_parameters()}
    engine.step()
    params = full_params(engine)

    # engine checkpoint round trip: a fresh engine that loads it holds the same parameters
    tag = f"stage{stage}"
    engine.save_checkpoint(tmpdir, tag=tag)
    other = zero3_loss_module(tiny_model())
    fresh, *_ = deepspeed.initialize(model=other, model_parameters=other.parameters(), config=config, mpu=cpx.mpu)
    fresh.load_checkpoint(tmpdir, tag=tag)
    loaded = full_params(fresh)
    dist.barrier()
    return grads, params, loaded


def check_all_stages(batches, tmpdir):
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # one host: DeepSpeed insists on it
    # The CPU accelerator JIT-builds a shared-memory all-reduce (~60 s per fresh machine) that only
    # inference uses; training goes through gloo, so skip the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ref_grads, ref_params = reference_step(tiny_model(), batches)
    for stage in (0, 1, 2, 3):
        grads, params, loaded = engine_step(stage, batches, os.path.join(tmpdir, f"s{stage}"))
        for name, ref in ref_grads.items():
            err = (grads[name] - ref).norm() / ref.norm()
            assert err < 1e-5, f"ZeRO {stage}: gradient of {name} off by {err:.2e}"
        for name, ref in ref_params.items():
            assert torch.allclose(params[name], ref, rtol=1e-5, atol=1e-6), f"ZeRO {stage}: updated {name} differs"
            assert torch.equal(loaded[name], params[name]), f"ZeRO {stage}: checkpoint round trip of {name}"


@pytest.mark.slow
def test_zero_stages_match_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    batches = [torch.randint(0, VOCAB, (1, T)) for _ in range(DP)]
    run_distributed(check_all_stages, CP * DP, batches, str(tmp_path))
