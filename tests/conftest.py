"""Test setup. Order matters: TRITON_INTERPRET must be set before anything imports triton, and the
torchvision schema workaround must run before open_clip/transformers import torchvision."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # overridden below when a GPU is present
import torch  # noqa: E402

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1" and "ADAMERGE_TEST_INTERPRET" not in os.environ:
    del os.environ["TRITON_INTERPRET"]


def _torchvision_workaround():
    """The pinned CPU torch sits beside a CUDA build of torchvision whose import fails with
    'operator torchvision::nms does not exist'. Define the two schemas it looks up, only if needed."""
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError) as e:
        if "torchvision::nms" not in str(e):
            return
        import sys

        for mod in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_workaround.lib = lib


_torchvision_workaround()

import adamerge_fast.ops._backend as _backend  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Kernels allocate their outputs NaN-filled under test: an unwritten element fails the comparison."""
    old = _backend.POISON_OUTPUTS
    _backend.POISON_OUTPUTS = True
    yield
    _backend.POISON_OUTPUTS = old


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
