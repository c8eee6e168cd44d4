"""benchmarks/bench_stage_variants.py tells a variant of a kernel stage that computes the same
from one that does not (on the interpreter: outputs only, no timing)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import ctxpar.kernels.triton.query_grad as query_grad
import ctxpar.kernels.triton.source_grad as source_grad

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run times; this checks the CPU path")


def test_same_code_agrees_and_a_changed_product_does_not(tmp_path):
    same, changed = tmp_path / "source_grad_copy.py", tmp_path / "query_grad_intra_negated.py"
    same.write_text(open(source_grad.__file__).read())
    code = open(query_grad.__file__).read()
    assert code.count("dq += mma(mma(") == 1
    changed.write_text(code.replace("dq += mma(mma(", "dq -= mma(mma("))
    subprocess.run([sys.executable, "benchmarks/bench_stage_variants.py", str(same), str(changed)], check=True,
                   env={**os.environ, "OUT": str(tmp_path)}, capture_output=True)
    rows = {os.path.basename(r["variant"]): r for r in json.loads((tmp_path / "bench_stage_variants.json").read_text())}
    assert rows["source_grad_copy.py"]["stage"] == "source_grads"
    assert rows["source_grad_copy.py"]["rel_diff"] < 1e-6
    assert rows["query_grad_intra_negated.py"]["stage"] == "query_grads"
    assert rows["query_grad_intra_negated.py"]["rel_diff"] > 0.1
