"""Official AdaMerging / task_vectors checkpoints read without running code from the file.

The paper's checkpoints (``zeroshot.pt``, ``<task>/finetuned.pt``, ``head_<task>.pt``) are whole modules saved
with ``torch.save``: a ``src.modeling.ImageEncoder`` around an open_clip CLIP model (with torchvision
preprocessing transforms as attributes), or a ``src.modeling.ClassificationHead``. Unpickling them normally imports
``src.modeling`` and may run any code the file names. Here they are read by torch's own weights-only unpickler
(``torch.load(weights_only=True)``), which rebuilds tensors and plain containers itself; every other global the
file names must lie in :data:`STUBBED_MODULES` and is replaced by an inert stub class generated on the fly — the
stub only records the arguments and the pickled state it is given, so nothing of ``src``, open_clip, torch.nn or
torchvision is imported or called on behalf of the file. The globals are listed first from the pickle's opcodes
(``torch.serialization.get_unsafe_globals_in_checkpoint``, which executes nothing); a file naming anything else
(``posix.system``, ``builtins.eval``, a class of another package) is refused with a message naming the global,
before anything is unpickled. The parameters and persistent buffers are then read out of the stubs' recorded
``nn.Module`` state (``_parameters``, ``_buffers``, ``_modules``), with the keys ``module.state_dict()`` would give.

Only files whose top-level object is a class of the official modeling module (``src.modeling`` or ``modeling``:
:data:`OFFICIAL_MODULES`) are read this way (:func:`load_official`); every other pickle still needs an explicit
``trust_pickle=True`` (:func:`adamerge_fast.io.load_state_dict`).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

#: modules whose classes make a file an official checkpoint (the scripts run from ``src/`` pickle ``modeling.*``)
OFFICIAL_MODULES = ("src.modeling", "modeling")

#: every global from these modules (and their submodules) is replaced by an inert stub
STUBBED_MODULES = OFFICIAL_MODULES + ("open_clip", "torch.nn", "torchvision.transforms")


class RefusedPickle(ValueError):
    """A pickle that cannot be read without running code from it; the message names the file and the reason.
    (:func:`adamerge_fast.io.load_state_dict` reports it as a ``CheckpointError``; this module imports nothing of
    the package, so that ``io`` can use it.)"""


class Stub:
    """Base of the inert stand-ins for pickled globals: records constructor arguments and pickled state only."""

    _stub_global: str = ""

    def __init__(self, *args, **kwargs):
        self.__dict__["_stub_args"] = (args, kwargs)

    def __setstate__(self, state):
        self.__dict__["_stub_state"] = state

    def __repr__(self):
        return f"<inert stub of {self._stub_global}>"


def _stub_class(full_name: str) -> type:
    """A new :class:`Stub` subclass whose ``__module__``/``__qualname__`` spell ``full_name`` (the key under which
    torch's weights-only unpickler looks a global up)."""
    module, _, qualname = full_name.rpartition(".")
    cls = type(qualname.rpartition(".")[2], (Stub,), {"_stub_global": full_name, "__module__": module})
    cls.__qualname__ = qualname
    return cls


def _within(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_inert(path: str | os.PathLike) -> Any:
    """Unpickle the ``torch.save`` file ``path`` with every global from :data:`STUBBED_MODULES` replaced by an inert
    :class:`Stub`; tensors and containers are rebuilt by torch's weights-only unpickler.

    Raises :class:`RefusedPickle` naming the global when the file names one outside torch's weights-only allowlist
    and :data:`STUBBED_MODULES` (nothing is unpickled then), or when the file is not a ``torch.save`` zip archive.
    """
    ser = torch.serialization
    if not hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        raise RefusedPickle(f"{path}: reading pickled modules without running code needs torch >= 2.5")
    if not zipfile.is_zipfile(path):
        raise RefusedPickle(f"{path}: not a torch.save zip archive, so it cannot be read without running code")
    try:
        names = ser.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # a damaged archive or pickle stream
        raise RefusedPickle(f"{path}: unreadable pickle ({type(e).__name__}: {e})") from e
    refused = [n for n in names if not _within(n, STUBBED_MODULES)]
    if refused:
        raise RefusedPickle(
            f"{path}: refers to the global {refused[0]!r}, which is not read without running code (only tensors, "
            f"containers and inert stand-ins for classes of {', '.join(STUBBED_MODULES)})"
        )
    with ser.safe_globals([_stub_class(n) for n in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RefusedPickle(f"{path}: could not be read without running code ({first})") from e


def stub_name(obj: Any) -> str | None:
    """The global a stub stands for (``"src.modeling.ImageEncoder"``), or ``None`` for anything else."""
    return obj._stub_global if isinstance(obj, Stub) else None


def module_state_dict(obj: Any, what: str = "pickled module", prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of a stubbed ``nn.Module``: its parameters and persistent buffers (``None`` entries
    skipped), then its submodules', recursively, under dotted names — read from the recorded pickled state."""
    state = obj.__dict__.get("_stub_state") if isinstance(obj, Stub) else None
    if not isinstance(state, dict) or not all(k in state for k in ("_parameters", "_buffers", "_modules")):
        kind = stub_name(obj) or type(obj).__name__
        raise RefusedPickle(f"{what}: {prefix.rstrip('.') or 'the object'} ({kind}) is not a pickled nn.Module")
    out: dict[str, torch.Tensor] = {}
    for n, p in state["_parameters"].items():
        if p is not None:
            out[prefix + n] = p.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for n, b in state["_buffers"].items():
        if b is not None and n not in skip:
            out[prefix + n] = b.detach()
    for n, child in state["_modules"].items():
        if child is not None:
            out.update(module_state_dict(child, what, f"{prefix}{n}."))
    return out


@dataclass
class OfficialCheckpoint:
    """An official checkpoint read inertly: the pickled class (``"src.modeling.ImageEncoder"``), its state dict,
    and the plain (bool/int/float/str/None) attributes of the top-level object (e.g. a head's ``normalize``)."""

    type_name: str
    state_dict: dict[str, torch.Tensor]
    attributes: dict[str, Any] = field(default_factory=dict)


def load_official(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official AdaMerging / task_vectors checkpoint (a pickled ``src.modeling`` module) without running
    code (:func:`load_inert`). :class:`RefusedPickle` when the file names a global outside the allowlist or its
    top-level object is not a class of :data:`OFFICIAL_MODULES`."""
    obj = load_inert(path)
    name = stub_name(obj)
    if name is None or not _within(name, OFFICIAL_MODULES):
        kind = name or type(obj).__name__
        raise RefusedPickle(f"{path}: holds a {kind}, not an official AdaMerging checkpoint (a pickled "
                            f"{' or '.join(m + '.*' for m in OFFICIAL_MODULES)} module)")
    state = obj.__dict__.get("_stub_state") or {}
    attrs = {k: v for k, v in state.items()
             if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
    return OfficialCheckpoint(name, module_state_dict(obj, str(path)), attrs)


__all__ = [
    "OFFICIAL_MODULES",
    "STUBBED_MODULES",
    "RefusedPickle",
    "Stub",
    "load_inert",
    "stub_name",
    "module_state_dict",
    "OfficialCheckpoint",
    "load_official",
]
