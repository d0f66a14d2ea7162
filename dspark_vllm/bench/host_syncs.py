"""Count the calls that make the host wait for a device tensor's value.

    with HostSyncCounter() as syncs:
        step()
    print(len(syncs.calls), syncs.calls)

Counted for the duration of the block: the ``torch.Tensor`` methods that read a value back to
Python (``item``, ``tolist``, ``cpu``, ``numpy``, and the conversions behind ``if t:``,
``int(t)``, ``float(t)``), and the ATen ops whose output size depends on tensor values
(``nonzero``, ``unique``, ``masked_select``, ``bincount``: the host must learn the size before
it can allocate). On a GPU each is a wait for the device; on CPU the same calls are counted, so
a CPU test sees the syncs a GPU step would make.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
VALUE_SIZED_OPS = ("nonzero", "unique", "masked_select", "bincount")


class _ValueSizedOps(TorchDispatchMode):
    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith(VALUE_SIZED_OPS) or name.startswith(tuple(f"_{op}" for op in VALUE_SIZED_OPS)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}
        self._mode: _ValueSizedOps | None = None

    def __enter__(self) -> "HostSyncCounter":
        for name in METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def counted(t, *args, _real=real, _name=name, **kwargs):
                self.calls.append(_name)
                return _real(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        self._mode = _ValueSizedOps(self.calls)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved.clear()

    def __len__(self) -> int:
        return len(self.calls)
