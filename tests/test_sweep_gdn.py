"""benchmarks/sweep_gdn.py on the interpreter (comparison only, no timing): the defaults match
themselves, a swept constant (or two set together) takes effect (its gradients move by rounding, not
more) and is put back, and a value that cannot compile is recorded without stopping the sweep."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_gdn  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run times; this checks the CPU path")


def test_sweep_compares_each_value_with_the_defaults_and_restores_them(tmp_path):
    from ctxpar.kernels.triton import gdn_chunk_grad, gdn_function

    settings = [sweep_gdn.parse("gdn_chunk_grad.TILE=16,7"), sweep_gdn.parse("gdn_function.READ_RUN=2"),
                sweep_gdn.parse("gdn_chunk_grad.TILE=16+gdn_function.READ_RUN=2")]
    defaults = gdn_chunk_grad.TILE, gdn_function.READ_RUN
    rows = []
    sweep_gdn.sweep(settings, (2, 32, 32), 640, rows, str(tmp_path))  # ten chunks: nodes with several readers
    by_setting = {r["setting"]: r for r in rows}
    both = "gdn_chunk_grad.TILE=16+gdn_function.READ_RUN=2"
    assert list(by_setting) == ["defaults", "gdn_chunk_grad.TILE=16", "gdn_chunk_grad.TILE=7",
                                "gdn_function.READ_RUN=2", both]
    assert by_setting["defaults"]["max_rel_diff"] == 0.0
    for moved in ("gdn_chunk_grad.TILE=16", "gdn_function.READ_RUN=2", both):  # other tiles, other sums' order
        assert 0.0 < by_setting[moved]["max_rel_diff"] < 1e-5, moved
    # together, each moves rounding its own way: the pair is neither one alone
    singles = {by_setting[m]["max_rel_diff"] for m in ("gdn_chunk_grad.TILE=16", "gdn_function.READ_RUN=2")}
    assert by_setting[both]["max_rel_diff"] not in singles
    assert "error" in by_setting["gdn_chunk_grad.TILE=7"]  # tl.arange takes powers of two only
    assert (gdn_chunk_grad.TILE, gdn_function.READ_RUN) == defaults
    assert (tmp_path / "sweep_gdn.json").exists()


def test_a_constant_the_module_lacks_is_refused():
    with pytest.raises(SystemExit, match="has no NOT_A_CONSTANT"):
        sweep_gdn.parse("gdn_carry.NOT_A_CONSTANT=1")


def test_a_combination_takes_one_value_a_constant():
    with pytest.raises(SystemExit, match="one value a constant"):
        sweep_gdn.parse("gdn_chunk_grad.TILE=16,32+gdn_function.READ_RUN=2")
