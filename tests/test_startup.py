"""Start-up of a command on a CPU machine: spconv's CUDA kernel descriptions are not built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import networks.backend, torch
import spconv.pytorch, spconv.algo
took = time.perf_counter() - t0
sys.path.insert(0, "tests")
from helpers import tiny_net
net = tiny_net()
idx = torch.stack(torch.meshgrid(*[torch.arange(12)] * 3, indexing="ij"), -1).reshape(-1, 3).int()
idx = torch.cat([torch.zeros(len(idx), 1, dtype=torch.int32), idx], 1)
torch.manual_seed(1)
x = spconv.pytorch.SparseConvTensor(torch.rand(len(idx), 1), idx, [32, 32, 32], 1)
recon, _ = net(x)
recon.features.sum().backward()
grad = sum(float(p.grad.double().abs().sum()) for p in net.parameters() if p.grad is not None)
print(json.dumps({"light": spconv.algo.GEMM is None, "seconds": took, "out": recon.features.double().sum().item(), "grad": grad}))
"""


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_spconv_without_cuda_kernels_gives_the_same_model():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA spconv's kernels are needed")
    light, full = _probe(), _probe(CTVQ_SPCONV_FULL="1")
    assert light["light"] and not full["light"]
    assert light["out"] == full["out"] and light["grad"] == full["grad"]
    assert light["seconds"] < full["seconds"] / 2, (light, full)


def test_run_sh_test_help_names_the_data_the_tests_read():
    """``./run.sh test --help``: where the real-scan tests look for their data, then pytest's options."""
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "test", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.split("\n", 1)
    assert first.startswith("./run.sh test [pytest args]") and "CTVQ_CT_DATA" in first
    assert "usage:" in rest and "pytest" in rest
