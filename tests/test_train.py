"""Training: recipes, data, CP/DP-equivalent steps, exact resume, crash-safe checkpoints."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxpar.train import checkpoint
from ctxpar.train.cli import main as train_main
from ctxpar.train.config import RecipeError, load_recipe, validate
from ctxpar.train.data import Data
from ctxpar.train.parallel import Layout, setup
from ctxpar.train.telemetry import read_metrics
from ctxpar.train.trainer import Trainer, train
from tests.distributed import run_distributed

HAS_CP = importlib.util.find_spec("ctxpar.cp") is not None
REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(out_dir, name="tiny", **sections):
    raw = {
        "name": name,
        "out_dir": str(out_dir),
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 32, "state_dim": 16, "mlp_hidden": 64,
                  "max_seq_len": 128},
        "data": {"source": "passkey", "passkey_digits": 3},
        "train": {"steps": 6, "seq_len": 128, "batch_size": 4, "log_every": 1, "ckpt_every": 3, "threads": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": {"nproc": 1},
        "eval": {"passkey_depths": [0.5], "samples": 2, "heldout_batches": 1},
        "telemetry": {"progress_bar": False},
    }
    for key, values in sections.items():  # sections merge into the defaults above; plain keys replace
        raw[key] = {**raw.get(key, {}), **values} if isinstance(values, dict) else values
    return validate(raw)


def single_layout():
    return Layout(0, 1, 0, 1, torch.device("cpu"))


# --- recipes ------------------------------------------------------------------------------------


def test_bad_recipe_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(RecipeError, match=r"model\.d_modle"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"train\.stpes"):
        load_recipe(None, ["train.stpes=3"])
    with pytest.raises(RecipeError, match=r"optim\.lr"):
        load_recipe(None, ["optim.lr=-1"])
    with pytest.raises(RecipeError, match=r"engine: Input should be 'native' or 'deepspeed'"):
        load_recipe(None, ["engine=deepspeeed"])


def test_deepspeed_block_must_not_set_what_ctxpar_derives(tmp_path, capsys):
    recipe = tmp_path / "ds.yaml"
    recipe.write_text("engine: deepspeed\ndeepspeed:\n  zero_optimization: {stage: 2}\n  data_parallel_size: 2\n")
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.data_parallel_size is set by ctxpar from the number of ranks and parallel.context_parallel_size" \
        in err
    with pytest.raises(RecipeError, match=r"deepspeed\.gradient_clipping is set by ctxpar from optim\.grad_clip"):
        load_recipe(None, ["deepspeed.gradient_clipping=1.0"])
    ok = load_recipe(None, ["engine=deepspeed", "deepspeed.zero_optimization.stage=3"])
    assert ok.engine == "deepspeed" and ok.deepspeed == {"zero_optimization": {"stage": 3}}


def test_launcher_local_rank_flag(monkeypatch):
    from ctxpar.cli import take_local_rank

    argv = ["train", "r.yaml", "--set", "train.steps=2"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # the deepspeed launcher exports it too: the environment wins
    assert take_local_rank(["--local_rank=0", *argv]) == argv and os.environ["LOCAL_RANK"] == "1"
    monkeypatch.delenv("LOCAL_RANK")  # without it the flag fills it in
    assert take_local_rank([argv[0], "--local-rank", "3", *argv[1:]]) == argv and os.environ["LOCAL_RANK"] == "3"


def test_cli_reports_bad_key_and_exits_2(tmp_path, capsys):
    assert train_main(["--set", "parallel.context_paralel_size=2"]) == 2
    assert "parallel.context_paralel_size" in capsys.readouterr().err


def test_embedded_quickstart_and_alias():
    embedded = load_recipe()
    assert embedded == load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    assert embedded.parallel.context_parallel_size == 2
    aliased = load_recipe(None, ["parallel.sequence_parallel_size=1"])
    assert aliased.parallel.context_parallel_size == 1


@pytest.mark.parametrize("name", ["longctx-1m-2gpu.yaml", "finetune-longer.yaml"])
def test_shipped_recipes_validate(name):
    load_recipe(str(REPO / "recipes" / name))


# --- data ---------------------------------------------------------------------------------------


def test_batches_are_a_function_of_the_step():
    data = Data(tiny_recipe("/unused").data, seed=5)
    a, b = data.batch(3, 2, 128), data.batch(3, 2, 128)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(data.batch(4, 2, 128)[0], a[0])
    inputs, labels = a
    scored = labels != -100
    assert scored.sum(1).tolist() == [6, 6]  # the key inside the needle and the answer, 3 digits each
    assert torch.equal(labels[:, :-1][scored[:, :-1]], inputs[:, 1:][scored[:, :-1]])  # labels = next inputs


def test_mqar_scores_the_queried_values():
    from ctxpar.train.data import MQARTask

    task = MQARTask(pairs=4)
    ids, target = task.sample(40, torch.Generator().manual_seed(0))
    pairs = dict(zip(ids[:8:2].tolist(), ids[1:8:2].tolist()))
    queries = ids[-8:]
    assert target.sum() == 4 and torch.equal(ids[target], queries[1::2])
    assert all(pairs[k] == v for k, v in zip(queries[0::2].tolist(), queries[1::2].tolist()))


def test_bin_token_file(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16) % 300
    tokens.tofile(tmp_path / "tokens.bin")
    recipe = tiny_recipe(tmp_path, data={"source": "bin", "path": str(tmp_path / "tokens.bin"), "loss_on": "all"})
    inputs, labels = Data(recipe.data, 0).batch(0, 2, 64)
    assert torch.equal(labels[:, :-1], inputs[:, 1:]) and torch.equal((inputs[:, 1:] - inputs[:, :-1]) % 300,
                                                                      torch.ones(2, 63, dtype=torch.long))


def test_jsonl_text_with_builtin_tokenizer(tmp_path):
    lines = [json.dumps({"text": f"the sky is blue {i} times ."}) for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tiny_recipe(tmp_path, data={"source": "jsonl", "path": str(tmp_path / "docs.jsonl"), "loss_on": "all"})
    data = Data(recipe.data, 0)
    inputs, labels = data.batch(0, 2, 32)
    assert inputs.shape == labels.shape == (2, 32) and (labels != -100).all()
    assert data.tokenizer.eos_id in data.source.tokens  # documents are separated by <eos>


# --- CP / DP equivalence ------------------------------------------------------------------------


def _step_matches_single_process(out_dir: str, cp_sizes: list[int], archs: list[str]):
    """On every rank: one step's loss and gradients under (dp, cp) equal one process's on the batch."""
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    for arch in archs:
        sections = {"train": {"micro_batch_size": 1}, "model": {"arch": arch}}
        ref = Trainer(tiny_recipe(Path(out_dir) / f"ref{rank}", **sections), single_layout())
        ref_loss = ref.forward_backward(0)
        for cp in cp_sizes:
            recipe = tiny_recipe(Path(out_dir) / f"cp{cp}", parallel={"context_parallel_size": cp}, **sections)
            trainer = Trainer(recipe, setup(cp))
            loss = trainer.forward_backward(0)
            assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss), (arch, cp, loss, ref_loss)
            for (name, p), q in zip(trainer.model.named_parameters(), ref.model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{arch} cp={cp} {name}")


@pytest.mark.slow
def test_two_ranks_match_single_process(tmp_path):
    run_distributed(_step_matches_single_process, 2, str(tmp_path), [1, 2] if HAS_CP else [1], ["mamba2", "gdn"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CP, reason="needs ctxpar.cp")
def test_cp2_x_dp2_matches_single_process(tmp_path):
    run_distributed(_step_matches_single_process, 4, str(tmp_path), [2], ["mamba2"])


def test_activation_checkpointing_changes_nothing(tmp_path):
    """Checkpointed blocks, uneven token tiles and host-offloaded block inputs (the train section's
    activation-memory keys, which must reach the model) leave the loss and gradients unchanged."""
    settings = [{"activation_checkpointing": False}, {"activation_checkpointing": True},
                {"activation_checkpointing": True, "token_tile": 48, "offload_checkpoints": True}]
    grads = []
    for i, train in enumerate(settings):
        trainer = Trainer(tiny_recipe(tmp_path / str(i), train=train), single_layout())
        assert trainer.model.token_tile == train.get("token_tile", 16384)
        assert trainer.model.offload_checkpoints == train.get("offload_checkpoints", False)
        loss = trainer.forward_backward(0)
        grads.append((loss, [p.grad for p in trainer.model.parameters()]))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        for a, b in zip(grad, grads[0][1]):
            torch.testing.assert_close(a, b)


def test_compile_setting_reaches_the_blocks(tmp_path):
    """train.compile: auto leaves a CPU run eager; true wraps every block's per-token stages
    (torch.compile is lazy: nothing compiles until a step runs)."""
    for i, setting in enumerate(("auto", True)):
        trainer = Trainer(tiny_recipe(tmp_path / str(i), train={"compile": setting}), single_layout())
        stages = [getattr(m, name) for block in trainer.model.layers for m, name in block.per_token_stages()]
        compiled = [hasattr(stage, "_torchdynamo_orig_callable") for stage in stages]
        assert compiled == [setting is True] * len(stages)


# --- checkpoints and resume ---------------------------------------------------------------------


def test_resume_reproduces_uninterrupted_run(tmp_path):
    recipe = tiny_recipe(tmp_path)
    train(recipe)
    uninterrupted = read_metrics(recipe.run_dir / "metrics.jsonl")
    final = checkpoint.latest(recipe.run_dir)
    weights = (final / "model.safetensors").read_bytes()
    # Crash after step 3's checkpoint: the step-6 checkpoint never happened.
    import shutil

    shutil.rmtree(final)
    summary = train(recipe)
    assert summary["resumed_from"] == 3
    resumed = read_metrics(recipe.run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in uninterrupted
    ]
    assert (checkpoint.latest(recipe.run_dir) / "model.safetensors").read_bytes() == weights
    assert (recipe.run_dir / "loss.png").exists() and (recipe.run_dir / "eval" / "eval.json").exists()


def test_checkpoint_resumes_only_in_the_engine_that_wrote_it(tmp_path):
    saved = checkpoint.save(tmp_path, 1, lambda directory: None, single_layout(), keep_last=1, engine="native")
    with pytest.raises(ValueError, match=r"written by the native engine, not deepspeed.*train\.init_from"):
        checkpoint.load(saved, lambda directory: None, single_layout(), "deepspeed")


KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_train import tiny_recipe, single_layout
from ctxpar.train import checkpoint
from ctxpar.train.trainer import Trainer

trainer = Trainer(tiny_recipe({out!r}), single_layout())
trainer.step(0)
trainer.save(1)
trainer.step(1)

def die(obj, f, *args, **kwargs):  # a partial file, then SIGKILL, in the middle of the write
    open(f, "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = die
trainer.save(2)
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    script = KILL_DURING_SAVE.format(tests=str(REPO / "tests"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    recipe = tiny_recipe(tmp_path)
    assert checkpoint.latest(recipe.run_dir).name == "step_00000001"
    assert (checkpoint.checkpoint_dir(recipe.run_dir) / ".step_00000002.tmp").exists()  # the torn write
    trainer = Trainer(recipe, single_layout())  # resumes from the intact checkpoint
    assert trainer.start_step == 1
    saved = trainer.save(2)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step_00000001", "step_00000002"]
    json.loads((saved / "config.json").read_text())


def test_eval_cli_and_finetune_at_longer_context(tmp_path, capsys):
    from ctxpar.train.evaluate import main as eval_main

    base = tiny_recipe(tmp_path, train={"steps": 2, "ckpt_every": 0})
    train(base)
    run = str(base.run_dir)
    assert eval_main([run, "--nproc", "1", "--set", "eval.passkey_lengths=[128,256]"]) == 0
    report = json.loads((base.run_dir / "eval" / "eval.json").read_text())
    assert set(report["passkey"]) == {"128", "256"} and (base.run_dir / "eval" / "passkey.png").exists()
    assert "passkey accuracy" in capsys.readouterr().out
    # The architecture comes from the checkpoint; the recipe's model section only lengthens it.
    longer = tiny_recipe(tmp_path, name="longer", train={"seq_len": 256, "init_from": run})
    longer = validate({**longer.model_dump(exclude_unset=True), "model": {"max_seq_len": 256}})
    trainer = Trainer(longer, single_layout())
    assert trainer.model.cfg.num_levels == 9 and trainer.model.cfg.d_model == 32
    assert trainer.forward_backward(0) > 0


# --- FSDP2 --------------------------------------------------------------------------------------


def test_data_parallel_key():
    assert load_recipe().parallel.data_parallel == "ddp"
    assert load_recipe(None, ["parallel.data_parallel=fsdp"]).parallel.data_parallel == "fsdp"
    with pytest.raises(RecipeError, match=r"parallel\.data_parallel: Input should be 'ddp' or 'fsdp'"):
        load_recipe(None, ["parallel.data_parallel=zero3"])
    with pytest.raises(RecipeError, match=r"parallel\.data_parallel = fsdp is the native engine's"):
        load_recipe(None, ["engine=deepspeed", "parallel.data_parallel=fsdp"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CP, reason="needs ctxpar.cp")
def test_fsdp_cp2_x_dp2_matches_single_process_and_resumes(tmp_path):
    """FSDP2 over 4 ranks (CP = 2 x DP = 2) takes the single process's steps, and resumes exactly.

    2 micro-batches per rank (accumulation without sync), clipping that bites, activation
    checkpointing and several checkpointed loss tiles (the tied head recomputed in backward)."""
    from safetensors.torch import load_file

    from ctxpar.train.config import dump

    common = {"train": {"micro_batch_size": 1, "activation_checkpointing": True, "loss_tile": 16},
              "optim": {"eps": 1e-3, "grad_clip": 0.05}}  # a large eps: weights comparable after steps
    single = tiny_recipe(tmp_path, name="single", **common)
    train(single)
    fsdp = tiny_recipe(tmp_path, name="fsdp", parallel={"nproc": 4, "context_parallel_size": 2,
                                                        "data_parallel": "fsdp"}, **common)
    path = tmp_path / "fsdp.yaml"
    path.write_text(dump(fsdp))
    assert train_main([str(path)]) == 0

    expected, got = read_metrics(single.run_dir / "metrics.jsonl"), read_metrics(fsdp.run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 7))
    assert all(r["grad_norm"] > 0.05 for r in expected)  # every step clipped
    for r, g in zip(expected, got):  # fp32: only the order of reductions differs
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), r["step"]
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), r["step"]
    weights = load_file(str(checkpoint.latest(fsdp.run_dir) / "model.safetensors"))
    reference = load_file(str(checkpoint.latest(single.run_dir) / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for name, ref in reference.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    import shutil

    shutil.rmtree(checkpoint.latest(fsdp.run_dir))  # killed after step 3's checkpoint
    assert train_main([str(path)]) == 0
    assert json.loads((fsdp.run_dir / "summary.json").read_text())["resumed_from"] == 3
    record = lambda r: (r["step"], r["loss"], r["grad_norm"])  # noqa: E731
    assert [record(r) for r in read_metrics(fsdp.run_dir / "metrics.jsonl")] == [record(r) for r in got]
    for name, w in load_file(str(checkpoint.latest(fsdp.run_dir) / "model.safetensors")).items():
        assert torch.equal(w, weights[name]), f"resumed {name}"

    # The same checkpoint files: each wrapper resumes the other's step 3 (on another number of ranks).
    for source, resumer in ((single, fsdp), (fsdp, single)):
        cross = validate({**resumer.model_dump(exclude_unset=True), "name": f"{resumer.name}-from-{source.name}"})
        shutil.copytree(checkpoint.checkpoint_dir(source.run_dir) / "step_00000003",
                        checkpoint.checkpoint_dir(cross.run_dir) / "step_00000003")
        cross_path = tmp_path / f"{cross.name}.yaml"
        cross_path.write_text(dump(cross))
        assert train_main([str(cross_path)]) == 0
        for r, g in zip(expected[3:], read_metrics(cross.run_dir / "metrics.jsonl"), strict=True):
            assert g["step"] == r["step"] and g["loss"] == pytest.approx(r["loss"], rel=1e-5), cross.name


@pytest.mark.parametrize("every", [0, 1, 3])
def test_garbage_collection_between_steps(every):
    """Within the training loop's collection, a reference cycle dropped during a step lives until
    the first boundary of a step that collects (step % every == 0) and no longer; automatic
    collection is off meanwhile and back on after. every = 0 leaves Python's collector as it was."""
    import gc
    import weakref

    from ctxpar.train.collection import collect_between_steps

    class Node:
        pass

    assert gc.isenabled()
    alive = []
    with collect_between_steps(every) as boundary:
        assert gc.isenabled() == (every == 0)
        for step in range(1, 5):
            boundary(step)
            if alive:
                alive[-1] = alive[-1]() is not None
            cycle = Node()
            cycle.self = cycle
            alive.append(weakref.ref(cycle))
            del cycle
    assert gc.isenabled()
    if every:
        assert alive[:-1] == [step % every != 0 for step in range(2, 5)]
        assert alive[-1]() is None  # the collection on leaving


def test_host_offload_that_cannot_fit_fails_before_training(monkeypatch):
    """check_host_offload asks for exactly the bytes a forward parks (counted on the CPU path of
    HostOffload, times the ranks of the node) and refuses when the node has less available;
    without offload, or on the CPU, it asks nothing."""
    from ctxpar.models import CausalLM, ModelConfig, offload
    from ctxpar.train import trainer as trainer_module

    model = CausalLM(ModelConfig(vocab_size=37, d_model=32, n_layers=3, n_heads=2, head_dim=32, state_dim=16,
                                 mlp_hidden=64, max_seq_len=64))
    model.activation_checkpointing, model.offload_checkpoints, model.token_tile = True, True, 16
    parked, pack = [], offload.HostOffload._pack
    monkeypatch.setattr(offload.HostOffload, "_pack", lambda self, t: (parked.append(t.nbytes), pack(self, t))[1])
    model(torch.randint(0, 37, (2, 40))).sum().backward()
    need = sum(parked) * 4  # 4 local ranks
    gpu = Layout(0, 4, 0, 4, torch.device("cuda"))
    for available, fails in ((need - 1, True), (need, False)):
        monkeypatch.setattr(trainer_module, "available_host_memory", lambda: available)
        if fails:
            with pytest.raises(ValueError, match="offload_checkpoints=false"):
                trainer_module.check_host_offload(model, 2 * 40, gpu)
        else:
            trainer_module.check_host_offload(model, 2 * 40, gpu)
    monkeypatch.setattr(trainer_module, "available_host_memory", lambda: 0)
    trainer_module.check_host_offload(model, 2 * 40, Layout(0, 4, 0, 4, torch.device("cpu")))
    model.offload_checkpoints = False
    trainer_module.check_host_offload(model, 2 * 40, gpu)
