"""DeepSpeed engine with ctxpar context parallelism: 4 CPU ranks, CP = 2 x DP = 2.

The plugin: after one step, the gradients and the updated parameters of ZeRO 0-3 must equal a
single-process reference (the data-parallel mean of the full-sequence token-mean loss,
differentiated in one process). ``ctxpar train`` with ``engine: deepspeed``: the losses of a run
must equal those of ctxpar's own trainer in one process, and a resumed run the uninterrupted one.
"""

import copy
import json
import os
import random
import shutil

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

    from ctxpar.integrations.deepspeed import skip_shm_comm_build

    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # one host: DeepSpeed insists on it
    skip_shm_comm_build()
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


@pytest.mark.slow
@pytest.mark.parametrize("stage, ranks", [(2, 4), (3, 2)], ids=["zero2-cp2xdp2", "zero3-cp2"])  # 2 ranks: time
def test_ctxpar_train_deepspeed_matches_native_and_resumes(tmp_path, monkeypatch, stage, ranks):
    from safetensors.torch import load_file

    from ctxpar.cli import main as ctxpar_main
    from ctxpar.train import checkpoint
    from ctxpar.train.config import dump
    from ctxpar.train.telemetry import read_metrics
    from ctxpar.train.trainer import train
    from tests.test_train import tiny_recipe

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.delenv("LOCAL_RANK")  # set below by --local_rank; restored when the test ends
    seed = random.randrange(2**31)  # fresh data and initial weights every run
    # 2 micro-batches per rank and step: DeepSpeed's gradient accumulation is exercised too. A large
    # Adam eps (see EPS above) keeps the weights a smooth function of the gradients, so they can be
    # compared after several steps.
    common = {"train": {"seed": seed, "micro_batch_size": 1}, "optim": {"eps": EPS}}
    native = tiny_recipe(tmp_path, name="native", **common)  # one process: no CP, no DP, no DeepSpeed
    train(native)
    ds = tiny_recipe(tmp_path, name="ds", engine="deepspeed", deepspeed={"zero_optimization": {"stage": stage}},
                     parallel={"nproc": ranks, "context_parallel_size": 2}, **common)
    path = tmp_path / "ds.yaml"
    path.write_text(dump(ds))
    assert ctxpar_main(["--local_rank=0", "train", str(path)]) == 0  # the flag the deepspeed launcher adds
    assert os.environ["LOCAL_RANK"] == "0"

    expected, got = read_metrics(native.run_dir / "metrics.jsonl"), read_metrics(ds.run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 7))
    for r, g in zip(expected, got):  # fp32 on CPU: only the order of reductions differs
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), f"seed {seed} step {r['step']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), f"seed {seed} step {r['step']}"
    weights = load_file(str(checkpoint.latest(ds.run_dir) / "model.safetensors"))
    for name, ref in load_file(str(checkpoint.latest(native.run_dir) / "model.safetensors")).items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}, {name}: {m}")

    shutil.rmtree(checkpoint.latest(ds.run_dir))  # killed after step 3's checkpoint
    assert ctxpar_main(["train", str(path)]) == 0
    assert json.loads((ds.run_dir / "summary.json").read_text())["resumed_from"] == 3
    resumed = read_metrics(ds.run_dir / "metrics.jsonl")
    record = lambda r: (r["step"], r["loss"], r["grad_norm"])  # noqa: E731
    assert [record(r) for r in resumed] == [record(r) for r in got]
    assert load_file(str(checkpoint.latest(ds.run_dir) / "model.safetensors")).keys() == weights.keys()
    for name, w in load_file(str(checkpoint.latest(ds.run_dir) / "model.safetensors")).items():
        assert torch.equal(w, weights[name]), f"seed {seed}: resumed {name}"
