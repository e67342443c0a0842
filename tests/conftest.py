"""Shared fixtures and capability-based skip markers (from dcgen_quant.capabilities)."""

from __future__ import annotations

import os

import pytest
import torch

from dcgen_quant import capabilities

# Without a GPU the Triton kernels run in the interpreter. Triton fixes that mode when it is
# first imported, so it is chosen here, before any test module can import triton.
if "TRITON_INTERPRET" not in os.environ and capabilities.cuda_unavailable():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    reasons = {
        "gpu": capabilities.cuda_unavailable(),
        "nvcc": capabilities.nvcc_unavailable(),
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread():
    """One torch thread for the test (xdist workers have one already; a plain ``pytest`` run has
    the machine's count): tiny models' many small ops run faster, and the bits of a CPU matmul
    may depend on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed():
    """Seeds torch's global generator; returns a fresh torch.Generator with the same seed."""
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core's worth of intra-op threads.
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)
