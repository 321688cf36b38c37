"""Test setup. Order matters: TRITON_INTERPRET must be set before anything imports triton, and the
torchvision schema workaround must run before open_clip/transformers import torchvision."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # overridden below when a GPU is present
import torch  # noqa: E402

if (
    torch.cuda.is_available()
    and os.environ.get("TRITON_INTERPRET") == "1"
    and "ADAMERGE_TEST_INTERPRET" not in os.environ
):
    del os.environ["TRITON_INTERPRET"]


from adamerge_fast._compat import import_torchvision_safely  # noqa: E402

# The pinned CPU torch sits beside a CUDA build of torchvision whose import fails with
# 'operator torchvision::nms does not exist'; the package's shared workaround defines the schemas it needs.
import_torchvision_safely()

import adamerge_fast.ops._common as _ops_common  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Kernels allocate their outputs NaN-filled under test: an unwritten element fails the comparison."""
    old = _ops_common.POISON_OUTPUTS
    _ops_common.POISON_OUTPUTS = True
    yield
    _ops_common.POISON_OUTPUTS = old


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
