"""A process-group check for tests: while `checked_collectives()` is active, every
torch.distributed collective verifies that each tensor it is handed lives on a device type its
group's backend takes (what nccl enforces on GPUs: no CPU tensors) and raises `WrongDevice`
naming the collective, the device and the backend otherwise. Counts the calls it checked."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from cel_torchrec.distributed.collectives import backend_device_types

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "scatter")


class WrongDevice(RuntimeError):
    pass


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


@contextlib.contextmanager
def checked_collectives():
    """Yields a dict: collective name -> calls checked."""
    calls: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, fn):
        def checked(*args, **kwargs):
            group = kwargs.get("group")
            types = backend_device_types(group)
            for t in _tensors([*args, *kwargs.values()]):
                if t.device.type not in types:
                    raise WrongDevice(f"dist.{name} got a tensor on {t.device}, but the backend "
                                      f"{dist.get_backend_config(group)!r} takes {sorted(types)}")
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return checked

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
