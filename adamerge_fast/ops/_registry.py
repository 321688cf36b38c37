"""Backend registry and dispatcher: the one source of the backend names and of the ``auto`` order.

:func:`register_backend` records a backend under a name together with where ``auto`` may pick it
(``auto={device_type: ops}``, ``"*"`` for every device type) and its ``priority`` (one number, or one per op:
``{op: priority, "*": default}``). On a device type and op, ``auto`` tries the backends that declare it, highest
priority for that op first (ties: registration order), and takes the first that is available there;
:func:`auto_order` returns that order. The built-in registrations are one
block in :mod:`adamerge_fast.ops`.

The public ops resolve a backend name once per call (``"auto"``, an explicit name, or the ``ADAMERGE_BACKEND``
environment variable) and pass the *resolved* name into the ``torch.library`` custom op, so the choice is
visible to ``torch.compile`` and ``opcheck`` as a plain string argument. An explicit request for a backend
that is not available on the device of the inputs raises :class:`BackendUnavailableError` naming why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch

from ._backend import Backend

log = logging.getLogger("adamerge_fast")

OPS = ("merge", "merge_many", "merged_linear", "entropy", "merged_lora_linear", "linear_entropy")
ANY_DEVICE = "*"  # an ``auto`` key standing for every device type


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, or wrong device)."""


class _Registration(NamedTuple):
    factory: Callable[[], Backend]
    auto: Mapping[str, frozenset[str]]  # device type (or ANY_DEVICE) -> ops that auto may pick this backend for
    priority: Mapping[str, int]  # op (or ANY_DEVICE: every other op) -> priority

    def priority_of(self, op: str) -> int:
        return self.priority.get(op, self.priority.get(ANY_DEVICE, 0))


_REGISTRY: dict[str, _Registration] = {}
_INSTANCES: dict[str, Backend | BaseException] = {}  # constructed backends, or why construction failed
_AUTO_ORDERS: dict[tuple[str, str], tuple[str, ...]] = {}  # auto_order cache, cleared on (un)registration


def register_backend(
    name: str,
    factory: Callable[[], Backend],
    *,
    auto: Mapping[str, Iterable[str]] | None = None,
    priority: int | Mapping[str, int] = 0,
) -> None:
    """Register (or replace) the backend ``name``, constructed lazily by ``factory()`` on first use.

    ``auto``: ``{device_type: ops}`` where ``auto`` may pick this backend (``"*"``: every device type; ops from
    :data:`OPS`); None: only explicit requests. ``priority``: higher is tried first by ``auto``; an int, or
    ``{op: int}`` with ``"*"`` as the default for the ops not named (e.g. ``{"*": 300, "merged_linear": 150}``:
    tried before a backend of priority 200 for every op but ``merged_linear``). ``factory`` may
    raise ``ImportError``/``OSError``/``RuntimeError`` (not installed, not built): the backend is then reported
    unavailable with that message.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_backend({name!r}): factory must be callable, got {type(factory).__name__}")
    declared: dict[str, frozenset[str]] = {}
    for device_type, ops in (auto or {}).items():
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = [op for op in ops if op not in OPS]
        if not isinstance(device_type, str) or unknown:
            raise ValueError(
                f"register_backend({name!r}): auto must map device types to ops from {OPS}, got {device_type!r}: {ops}"
            )
        declared[device_type] = frozenset(ops)
    prio = dict(priority) if isinstance(priority, Mapping) else {ANY_DEVICE: priority}
    bad = {k: v for k, v in prio.items() if (k != ANY_DEVICE and k not in OPS) or isinstance(v, bool)
           or not isinstance(v, int)}  # fmt: skip
    if bad:
        raise ValueError(
            f"register_backend({name!r}): priority must be an int or map ops from {OPS} (or '*') to ints, got {bad}"
        )
    _REGISTRY[name] = _Registration(factory, MappingProxyType(declared), MappingProxyType(prio))
    _INSTANCES.pop(name, None)
    _AUTO_ORDERS.clear()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (its name, its place in ``auto`` and its constructed object)."""
    if name not in _REGISTRY:
        raise ValueError(f"unregister_backend: unknown backend {name!r}; registered: {backend_names()}")
    del _REGISTRY[name]
    _INSTANCES.pop(name, None)
    _AUTO_ORDERS.clear()


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def auto_order(device_type: str, op: str) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on tensors of ``device_type``, in order."""
    key = (device_type, op)
    order = _AUTO_ORDERS.get(key)
    if order is None:
        if op not in OPS:
            raise ValueError(f"auto_order: unknown op {op!r}; expected one of {OPS}")
        ranked = []
        for i, (name, reg) in enumerate(_REGISTRY.items()):
            if op in reg.auto.get(device_type, ()) or op in reg.auto.get(ANY_DEVICE, ()):
                ranked.append((-reg.priority_of(op), i, name))
        order = _AUTO_ORDERS[key] = tuple(name for *_, name in sorted(ranked))
    return order


class _BackendNames(Sequence):
    """Read-only view of :func:`backend_names` (follows later registrations)."""

    def __getitem__(self, i):
        return backend_names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name) -> bool:
        return name in _REGISTRY

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _BackendNames)) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(backend_names())


class _AutoOrder(Mapping):
    """Read-only view ``{device_type: {op: auto_order(device_type, op)}}`` over the device types that
    registrations name (``"*"`` entries included in each); :func:`auto_order` answers any device type."""

    def _device_types(self) -> list[str]:
        seen = dict.fromkeys(dt for reg in _REGISTRY.values() for dt in reg.auto if dt != ANY_DEVICE)
        return list(seen)

    def __getitem__(self, device_type: str) -> Mapping[str, tuple[str, ...]]:
        if device_type not in self._device_types():
            raise KeyError(device_type)
        return MappingProxyType({op: auto_order(device_type, op) for op in OPS})

    def __iter__(self):
        return iter(self._device_types())

    def __len__(self) -> int:
        return len(self._device_types())

    def __repr__(self) -> str:
        return repr({dt: dict(self[dt]) for dt in self})


BACKEND_NAMES: Sequence[str] = _BackendNames()
AUTO_ORDER: Mapping[str, Mapping[str, tuple[str, ...]]] = _AutoOrder()


def get_backend(name: str) -> Backend:
    """The backend object; raises :class:`BackendUnavailableError` if it cannot be constructed."""
    inst = _INSTANCES.get(name)
    if inst is None:
        reg = _REGISTRY.get(name)
        if reg is None:
            raise ValueError(f"unknown backend {name!r}; expected one of {('auto', *backend_names())}")
        try:
            inst = reg.factory()
        except (ImportError, OSError, RuntimeError) as e:  # not installed / not built: remembered
            inst = e
            log.debug("backend %s could not be loaded: %s", name, e)
        _INSTANCES[name] = inst
    if isinstance(inst, BaseException):
        raise BackendUnavailableError(f"backend {name!r} is not available: {inst}") from inst
    return inst


def backend_status(device: torch.device | str = "cpu") -> dict[str, str]:
    """``{name: "available" | reason}`` for every registered backend on ``device``."""
    device = torch.device(device)
    out = {}
    for name in _REGISTRY:
        try:
            reason = get_backend(name).unavailable_reason(device)
        except BackendUnavailableError as e:
            reason = str(e)
        out[name] = reason or "available"
    return out


_warned: set[str] = set()


def resolve(backend: str | None, op: str, device: torch.device) -> str:
    """Turn ``backend`` (``None``/``"auto"``/a name) into the name of a backend that runs ``op`` here."""
    if backend is None or backend == "auto":
        backend = os.environ.get("ADAMERGE_BACKEND", "auto") or "auto"
    if backend != "auto":
        be = get_backend(backend)  # raises a clear error when unknown, not built or not installed
        reason = be.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run {op} on {device}: {reason} (registered: {', '.join(_REGISTRY)})"
            )
        return backend
    order = auto_order(device.type, op)
    for name in order:
        try:
            if get_backend(name).available(device):
                return name
        except BackendUnavailableError:
            pass
        key = f"{name}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            log.debug("auto: backend %s unavailable on %s, trying the next", name, device.type)
    raise BackendUnavailableError(
        f"auto: no backend runs {op} on {device} (tried {order}; registered: {backend_names()})"
    )
