"""A second device on a CPU-only machine, strict about mixing devices the way CUDA is.

CI has no GPU, yet the bug users hit is a tensor left on the CPU meeting one on the model's device.
`fake_device()` provides such a device: a tensor moved there is a `FakeDeviceTensor`, a wrapper
subclass that reports `device='meta'` while holding a real CPU tensor (`_cpu`), so models compute
real values (`.item()`, `.tolist()`, EOS checks in `generate` all work) and autograd runs as usual.
Every aten op that touches a fake-device tensor goes through `FakeDeviceTensor.__torch_dispatch__`,
which raises "Expected all tensors to be on the same device" when a CPU tensor is an operand, with
the exceptions CUDA makes too: 0-dim CPU tensors (scalars), CPU index tensors in advanced
indexing, and the explicit transfers `.to()` / `.cpu()` / `copy_`.

Two modes, active inside `fake_device()`, put tensors there:
- `_FakeDeviceDispatch` (a TorchDispatchMode) catches every aten op given `device=meta` (factories
  such as `torch.arange(n, device=model.device)`, and `_to_copy`, i.e. `.to(meta)`), computes it on
  the CPU and wraps the result. It runs below autograd, so `.to()` stays differentiable.
- `_FakeDeviceFactories` (a TorchFunctionMode) catches `torch.tensor` / `torch.as_tensor` /
  `torch.asarray` / `Tensor.new_tensor` with `device=meta`, which build their tensor without
  passing through the dispatcher's Python key.

A plain `meta` tensor (no values) meeting a fake-device tensor means something was put on the device
outside `fake_device()` (or by a factory these modes miss): that raises too, so a gap in the harness
fails loudly instead of passing silently. Usage:

    with fake_device() as device:
        adapter.model.to(device)
        ...  # davsp code under test

Why `meta`: it is the one device besides the CPU that a CPU-only PyTorch holds tensors of and runs
autograd on. The price: inside `fake_device()` nothing can use the real meta device (a shape-only
13B model built there would be materialized on the CPU), so the modes stay scoped to the code under
test. Each op costs a Python round trip: the tiny models run about 3x slower than on the CPU.

DAVSP_TEST_DEVICE (cpu by default, e.g. cuda) is where the suite's session models load; with a real
device, tests/test_device.py runs on it instead of on this stand-in.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FAKE = torch.device("meta")
CPU = torch.device("cpu")

aten = torch.ops.aten
_TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
              aten._copy_from_and_resize.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# ops that, like their CUDA kernels, take a 0-dim CPU tensor as a plain number (besides pointwise ops)
_SCALAR_OPERAND = {aten.masked_fill.Tensor, aten.masked_fill_.Tensor, aten.fill.Tensor, aten.fill_.Tensor, *_INDEXING}
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class FakeDeviceTensor(torch.Tensor):
    """Reports device `meta`; its values live in `self._cpu`."""

    _cpu: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl  # ops reach __torch_dispatch__ unwrapped

    @staticmethod
    def __new__(cls, cpu: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, cpu.shape, strides=cpu.stride(), storage_offset=cpu.storage_offset(), dtype=cpu.dtype,
            layout=cpu.layout, device=FAKE, requires_grad=False,
        )
        wrapper._cpu = cpu
        return wrapper

    def tolist(self):  # torch refuses tolist() on subclasses; on CUDA it copies to the host
        return self._cpu.tolist()

    def __repr__(self) -> str:
        return f"FakeDeviceTensor({self._cpu!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _map(fn, x):
    """fn over the leaves of nested lists / tuples / dicts (op arguments and results); faster than pytree."""
    if isinstance(x, (list, tuple)):
        return type(x)([_map(fn, y) for y in x])
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return fn(x)


def _leaves(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)
    else:
        yield x


def _device(value) -> torch.device | None:
    return None if value is None else torch.device(value)


def _check_operands(func, args, kwargs) -> None:
    """Raise as CUDA does when a CPU tensor is an operand next to the fake device, unless CUDA accepts it
    there: a transfer, a CPU index tensor, or a 0-dim CPU tensor where a kernel reads it as a number."""
    if func in _TRANSFERS:
        return
    index_tensors = {id(t) for t in args[1] if isinstance(t, torch.Tensor)} if func in _INDEXING else set()
    scalars_ok = torch.Tag.pointwise in func.tags or func in _SCALAR_OPERAND
    for leaf in _leaves((args, kwargs)):
        if not isinstance(leaf, torch.Tensor) or isinstance(leaf, FakeDeviceTensor):
            continue
        if leaf.device == FAKE:
            raise RuntimeError(f"{func}: a plain meta tensor (no values) met the fake device; it was created "
                               "outside fake_device() or by a factory tests/fake_device.py does not catch")
        if id(leaf) in index_tensors or (scalars_ok and leaf.dim() == 0):
            continue
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"meta (fake) and {leaf.device}! (in {func}, operand of shape {tuple(leaf.shape)})")


def _run(func, args, kwargs):
    """Compute `func` on the CPU values; wrap its tensor outputs unless it was asked for the CPU."""
    _check_operands(func, args, kwargs)
    originals = {}  # id of an unwrapped input -> what the caller passed, so in-place ops return it

    def unwrap(x):
        if isinstance(x, FakeDeviceTensor):
            originals[id(x._cpu)] = x
            return x._cpu
        if isinstance(x, torch.Tensor):
            originals[id(x)] = x
        return x

    target = _device(kwargs.get("device"))
    args, kwargs = _map(unwrap, args), _map(unwrap, kwargs)
    if target == FAKE:
        kwargs = {**kwargs, "device": CPU}
    out = func(*args, **kwargs)

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:
            return originals[id(x)]
        return x if target == CPU else FakeDeviceTensor(x)

    return _map(wrap, out)


class _FakeDeviceDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _device(kwargs.get("device")) == FAKE:
            return _run(func, args, kwargs)
        return func(*args, **kwargs)  # fake-device operands go on to FakeDeviceTensor.__torch_dispatch__


class _FakeDeviceFactories(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _DATA_FACTORIES:
            return func(*args, **kwargs)
        data = args[1] if func is torch.Tensor.new_tensor else args[0]
        device = _device(kwargs.get("device"))
        if device is None:  # new_tensor follows self; tensor/as_tensor follow a tensor given as data
            origin = args[0] if func is torch.Tensor.new_tensor else data
            device = origin.device if isinstance(origin, torch.Tensor) else None
        if device != FAKE and not any(isinstance(x, FakeDeviceTensor) for x in _leaves(data)):
            return func(*args, **kwargs)
        # these read their data's values below the Python dispatch key: give them the CPU values
        made = func(*_map(values, args), **{**kwargs, "device": CPU if device == FAKE else device})
        if device != FAKE:
            return made
        return made.detach().to(FAKE).requires_grad_(made.requires_grad)


@contextmanager
def fake_device():
    """Inside: `x.to(device)` and factories with `device=device` make fake-device tensors (device is `meta`)."""
    with _FakeDeviceFactories(), _FakeDeviceDispatch():
        yield FAKE


def values(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU values of a fake-device tensor (a CPU tensor is returned as is)."""
    return tensor._cpu if isinstance(tensor, FakeDeviceTensor) else tensor


def requested_device() -> str:
    """DAVSP_TEST_DEVICE: where the session's tiny models go (cpu by default; cuda runs the suite on a GPU)."""
    return os.environ.get("DAVSP_TEST_DEVICE", "cpu")


def device_under_test() -> str:
    """Where tests/test_device.py puts the models: the requested device, or 'fake' instead of the CPU."""
    device = requested_device()
    return "fake" if device == "cpu" else device


def load_on_device(path, device: str):
    """`load_adapter(path)` with the model on `device`; 'fake' loads on the CPU and moves it to the fake device."""
    from davsp.adapters import load_adapter

    if device != "fake":
        return load_adapter(str(path), device=device)
    adapter = load_adapter(str(path))
    with fake_device() as fake:
        adapter.model.to(fake)
    return adapter
