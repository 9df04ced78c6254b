"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: inside `no_host_sync()`, every
operation that makes a CUDA host wait for the device raises `HostSync` naming the call.

On CPU nothing waits, so the check is by operation: reading a tensor's value on the host
(`item`, `tolist`, `bool`/`int`/`float`, `.cpu()`, `.numpy()`, `.to("cpu")`) and the ops whose
output shape depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`bincount`, `repeat_interleave` without `output_size`, `equal`). Tensor methods are seen as torch
functions, aten ops as dispatched (below autograd), so a boolean index is caught through its
`nonzero`. The real CUDA check is tests/cuda/test_cuda.py::test_step_has_no_host_sync."""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostSync(RuntimeError):
    pass


_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
_DATA_SHAPED = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "bincount", "equal", "is_nonzero", "_local_scalar_dense",
                "nonzero_numpy", "argwhere"}


def _where() -> str:
    """Our innermost frames (and the library frame below them) of the offending call."""
    stack = [f for f in traceback.extract_stack() if "host_sync.py" not in f.filename]
    ours = [f for f in stack if "site-packages" not in f.filename and "<frozen" not in f.filename]
    lib = [f for f in stack if "site-packages" in f.filename and "/torch/" not in f.filename]
    short = lambda f: f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno}"
    return " <- ".join([*(f"[{short(lib[-1])}]" for _ in lib[-1:]), *map(short, ours[-3:][::-1])])


class _Functions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _HOST_READS or (name == "to" and _to_host(args, kwargs)):
            raise HostSync(f"host read {name} at {_where()}")
        return func(*args, **kwargs)


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class _Ops(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _DATA_SHAPED or _mask_index(name, args) or (
                name == "repeat_interleave" and kwargs.get("output_size") is None
                and (len(args) < 3 or args[-1] is None)):
            raise HostSync(f"data-dependent op {name} at {_where()}")
        return func(*args, **kwargs)


def _mask_index(name: str, args) -> bool:
    """A boolean-mask index (`x[mask]`, `x[mask] = v`): its `nonzero` runs inside the kernel."""
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in args[1] if i is not None)


@contextlib.contextmanager
def no_host_sync():
    with _Functions(), _Ops():
        yield
