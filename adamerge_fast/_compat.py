"""Environment workarounds shared by the package and its tests.

``import_torchvision_safely``: a CPU build of torch installed beside a CUDA build of torchvision (or any
torchvision built against another torch) fails at import with ``operator torchvision::nms does not exist``,
and open_clip / transformers import torchvision. Defining the two operator schemas torchvision looks up at
import time lets the pure-Python parts (transforms, datasets) load; the compiled detection ops stay
unavailable, which this package never uses.
"""

from __future__ import annotations

import sys

_LIB = None  # the torch.library.Library that owns the defined schemas (kept alive for the process)


def import_torchvision_safely() -> bool:
    """Import torchvision, working around a missing ``torchvision::nms`` operator if needed.

    Call this before importing ``open_clip`` or ``transformers``. Returns ``True`` when torchvision imports
    (directly or after the workaround), ``False`` when it is not installed or still fails; never raises.
    Idempotent.
    """
    global _LIB
    try:
        import torchvision  # noqa: F401

        return True
    except ImportError as e:  # not installed (or a broken install unrelated to the schemas)
        if "torchvision::nms" not in str(e):
            return False
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            return False
    import torch

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    if _LIB is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB = lib
    try:
        import torchvision  # noqa: F401,F811

        return True
    except Exception:
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        return False


def _import_after_workaround(module: str, extra: str):
    import importlib

    import_torchvision_safely()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this needs {module} (pip install 'adamerge-fast[{extra}]'): {e}") from e


def import_open_clip():
    """``import open_clip`` after :func:`import_torchvision_safely`; a clear ImportError when it is missing."""
    return _import_after_workaround("open_clip", "clip")


def import_transformers():
    """``import transformers`` after :func:`import_torchvision_safely`; a clear ImportError when it is missing."""
    return _import_after_workaround("transformers", "hf")


__all__ = ["import_torchvision_safely", "import_open_clip", "import_transformers"]


def malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: hand the heap's free-but-resident memory back to the OS (no-op without glibc).

    A process that allocates and frees many tensors of a few MB (a streamed merge) otherwise keeps freed heap
    pages resident: glibc raises its mmap threshold after such frees, so later buffers come from the heap."""
    fn = getattr(malloc_trim, "fn", None)
    if fn is None:
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            fn = False
        malloc_trim.fn = fn
    if fn:
        fn(0)


def mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, threshold)`` for this process: every allocation of at least ``threshold``
    bytes is its own mapping, returned to the OS when freed (glibc otherwise raises the threshold to 32 MB after
    such frees, and a long run of tensor-sized buffers fragments the heap: measured on a streamed TIES merge of a
    307M-parameter model with a 1B Llama's tensor shapes, peak RSS 2.1 GB against 1.2 GB). Fixes the threshold
    for the rest of the process; returns whether it was set (False without glibc)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
