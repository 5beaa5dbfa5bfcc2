"""Shared fixtures: the real CT scans beside the checkout, and small helpers."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ct_data_dir() -> Path:
    env = os.environ.get("CTVQ_CT_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def ct_data_dir() -> Path:
    """Folder of the shared real CT scans; skips the test when it is absent."""
    path = _ct_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"shared CT data not found at {path} (set CTVQ_CT_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def gpu():
    """Skips the test unless a CUDA device is present."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """Small sparse GEMMs: one thread is much faster than contended OpenMP on shared CI cores.

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """Say at the end, even under -q, when the tests on real scans were skipped for want of the data."""
    path = _ct_data_dir()
    if not (path / "README.md").exists():
        terminalreporter.write_line(f"shared CT data not found at {path}: the tests on real scans were skipped; "
                                    "set CTVQ_CT_DATA to its folder to run them", yellow=True)
