"""Peak training memory: live tensor bytes during one training step (forward, backward, optimizer step).

tracemalloc does not see torch's allocator, and the CPU build has no allocator statistics, so
:class:`TensorMemoryTracker` counts tensor storages itself: a ``TorchDispatchMode`` records the bytes of
every storage an aten op creates (or resizes), plus the storages alive when the step starts
(parameters, optimizer state, the batch), and a weak reference on each storage subtracts its bytes when
it is freed. The peak of that running sum is the peak of live tensor memory of the step: parameters +
gradients + optimizer state + saved activations + temporaries. Not counted: workspaces allocated inside
a kernel (e.g. LAPACK's), allocator overhead and Python objects. :func:`profile_step_memory` also
reports the parts (parameters, gradients, optimizer state, activations saved for backward via
``torch.autograd.graph.saved_tensors_hooks``).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

MIB = 2.0 ** 20


class TensorMemoryTracker(TorchDispatchMode):
    """Running sum and peak of the bytes of live tensor storages (see :mod:`harness.memory`).

    ``existing``: tensors alive before the tracked region (their storages count from the start and
    stop counting when freed). Storages are counted once however many tensors view them.
    """

    def __init__(self, existing=()):
        super().__init__()
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for t in existing:
            self.track(t)

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return
        key, nb = id(st), st.nbytes()
        old = self._bytes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(st, partial(self._freed, key))
            self._bytes[key] = nb
            self.current += nb
        elif old != nb:  # resized in place
            self._bytes[key] = nb
            self.current += nb - old
        if self.current > self.peak:
            self.peak = self.current

    def _freed(self, key: int, _ref) -> None:
        self.current -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        if func._schema.is_mutable:  # in-place / out= ops may resize their arguments' storages
            tree_map_only(torch.Tensor, self.track, (args, kwargs))
        return out


def _tensors_in(obj, out: list, depth: int = 0) -> list:
    """Tensors inside ``obj`` (dicts, sequences, and attributes of objects like GaLore's projector)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        _tensors_in(vars(obj), out, depth + 1)
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass
class MemoryProfile:
    """Tensor memory of one training step, in bytes (see :mod:`harness.memory`)."""

    peak: int  # peak of live tensor bytes during forward + backward + optimizer step
    parameters: int
    gradients: int
    optimizer_state: int  # after the step
    activations: int  # distinct non-parameter storages saved for backward (the input batch included)

    def mib(self) -> dict:
        return {k: v / MIB for k, v in asdict(self).items()}


def profile_step_memory(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> MemoryProfile:
    """Run one training step on ``model``/``opt`` under :class:`TensorMemoryTracker` (it really steps)."""
    opt.zero_grad(set_to_none=True)
    params = list(model.parameters())
    existing = params + list(model.buffers()) + _tensors_in(dict(opt.state), []) + [x, y]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs and st.nbytes():
            saved[st.data_ptr()] = st.nbytes()
        return t

    param_bytes = storage_bytes(params)
    with TensorMemoryTracker(existing) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        del loss
        grad_bytes = storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = tracker.peak
    state_bytes = storage_bytes(_tensors_in(dict(opt.state), []))
    return MemoryProfile(peak, param_bytes, grad_bytes, state_bytes, sum(saved.values()))

