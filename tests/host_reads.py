"""Counting host reads inside a denoiser's calls, on the CPU: what would make the host wait for a GPU's queue.

A host read is an operation whose result Python needs before it can go on: `.item()`, `int(t)`, `bool(t)`, `.cpu()`,
`.tolist()`, `.numpy()`, `nonzero`, boolean-mask indexing. On the CPU none of them waits for anything, so they are
counted where they are made: `aten._local_scalar_dense`, `aten.is_nonzero`, `aten.nonzero`, `aten.masked_select` and
indexing with a boolean tensor through a dispatch mode, and `Tensor.cpu` / `.tolist` / `.numpy` by wrapping them.
`HostCopy.values` (the uncertainty exits' read of a copy that the device finished a call earlier) is not a read of the
call in flight, and is left out.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ee_diffusion.exits.uncertainty import HostCopy

aten = torch.ops.aten
_READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
}


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostReads) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter.counting:
            if func in _READS:
                self.counter.record(str(func))
            elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                    self.counter.record(f"{func} with a boolean index")
        return func(*args, **kwargs)


class HostReads:
    """Counts host reads made inside the calls of `denoiser` (its forward, with every hook on it).

    Use as a context manager around pipeline calls; `per_call` is the reads of each denoiser call, `kinds` what they
    were.
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser
        self.counting = False
        self.per_call: list[int] = []
        self.kinds: Counter[str] = Counter()

    def record(self, kind: str) -> None:
        self.per_call[-1] += 1
        self.kinds[kind] += 1

    def _start(self, *_) -> None:
        self.per_call.append(0)
        self.counting = True

    def _stop(self, *_) -> None:
        self.counting = False

    def __enter__(self) -> HostReads:
        self._stack = contextlib.ExitStack()
        stack = self._stack
        handles = [
            self.denoiser.register_forward_pre_hook(self._start),
            self.denoiser.register_forward_hook(self._stop),
        ]
        stack.callback(lambda: [handle.remove() for handle in handles])
        for name in ("cpu", "tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def wrapped(tensor, *args, _original=original, _name=name, **kwargs):
                if self.counting:
                    self.record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
            stack.callback(setattr, torch.Tensor, name, original)
        values = HostCopy.values

        def uncounted(copy: HostCopy) -> list:
            counting, self.counting = self.counting, False
            try:
                return values(copy)
            finally:
                self.counting = counting

        HostCopy.values = uncounted
        stack.callback(setattr, HostCopy, "values", values)
        stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
