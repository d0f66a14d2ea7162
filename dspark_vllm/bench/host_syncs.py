"""Count the calls that make the host wait for a device tensor's value.

    with HostSyncCounter() as syncs:
        step()
    print(len(syncs.calls), syncs.calls)

Wraps the ``torch.Tensor`` methods that read a value back to Python (``item``, ``tolist``,
``cpu``, ``numpy``, and the conversions behind ``if t:``, ``int(t)``, ``float(t)``) for the
duration of the block. On a GPU each is a wait for the device; on CPU the same calls are counted,
so a CPU test sees the syncs a GPU step would make.
"""

from __future__ import annotations

import torch

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


class HostSyncCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "HostSyncCounter":
        for name in METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def counted(t, *args, _real=real, _name=name, **kwargs):
                self.calls.append(_name)
                return _real(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved.clear()

    def __len__(self) -> int:
        return len(self.calls)
