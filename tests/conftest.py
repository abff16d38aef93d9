"""Test setup: the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here, before any test module
imports pilot or pilot_kernels. Tests that need the real (compiled) kernels run in a subprocess with
PILOT_REAL_KERNELS=1, which leaves the kernels compiled (ahead-of-time checks, CUDA tests).
"""
import os
from pathlib import Path

REAL_KERNELS = os.environ.get("PILOT_REAL_KERNELS") == "1"
if not REAL_KERNELS:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import pilot_kernels  # noqa: E402

assert pilot_kernels.KERNELS_INTERPRETED != REAL_KERNELS, \
    "pilot_kernels was imported before tests/conftest.py set TRITON_INTERPRET"

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Fashion-MNIST in the idx format, written once per test module that trains on it."""
    from test_train import write_fashion_mnist  # a helper of the training tests, imported once the kernels are set

    return write_fashion_mnist(tmp_path_factory.mktemp("fashion"))
