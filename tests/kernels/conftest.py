"""Fixtures of the Triton kernel tests: device, output poisoning, backend switch.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton and
the kernels run on CPU tensors in the interpreter. On a GPU machine (TRITON_INTERPRET unset) the
same tests run the compiled kernels on CUDA tensors; references are always computed on CPU.
Torch's deterministic mode fills every fresh ``torch.empty`` with NaN (floats) or the maximum
value (integers, 0xFF for uint8), so output elements a kernel fails to write show up as failures.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.deterministic

from dcgen_quant import capabilities, kernels, ops


@pytest.fixture(autouse=True)
def device():
    """Where the kernels run: "cpu" (interpreter) or "cuda"."""
    if reason := capabilities.triton_unavailable():
        pytest.skip(reason)
    if reason := kernels.unavailable_reason():
        if capabilities.cuda_unavailable():
            pytest.fail(f"the Triton interpreter should be usable on this CPU machine: {reason}")
        pytest.skip(reason)
    return "cpu" if capabilities.triton_interpret() else "cuda"


@pytest.fixture(autouse=True)
def poisoned_outputs():
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(2).isnan().all() and (torch.empty(2, dtype=torch.uint8) == 255).all()
    yield
    torch.use_deterministic_algorithms(was, warn_only=was_warn)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill


@pytest.fixture
def triton_backend():
    """Route the custom ops to the Triton kernels for one test (CPU tensors: interpreter)."""
    before = ops.get_backend()
    ops.set_backend("triton")
    yield
    ops.set_backend(before)
