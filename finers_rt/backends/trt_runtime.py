"""The `trt` graph backend: one serialized TensorRT engine, run by tensor name. Never imports torch.

Reads the `.engine` files written by `finers_rt.export.trt_build.build_engines`. IO is bound by
name from the graph's spec (`finers_rt.specs`): an engine whose names, directions, dtypes or static
dims differ from the spec is refused. Device memory and the stream come from cuda-python's
runtime bindings (`cuda.bindings.runtime`, the `cuda-python` package NVIDIA's own TensorRT samples
use): a small, torch-free dependency, while TensorRT's Python API allocates no buffers itself.

Per call: every input's shape is checked against the engine's optimisation profile (an error
names the dim and the limit), set on the context, copied to a device buffer that grows when
needed; execute_async_v3 runs on the backend's stream; outputs come back as numpy arrays.
Host buffers are pageable numpy arrays (copies are staged by the driver; pinned buffers would
overlap copies and compute: not done yet).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import StaleEngineError
from ..specs import GraphSpec
from . import BackendUnavailable, require

GPU_HINT = "pip install 'finers-rt[gpu]' on a machine with an NVIDIA GPU (on Jetson, TensorRT comes with JetPack)"


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable saying how to install it."""
    try:
        return require("tensorrt", "gpu")
    except BackendUnavailable as e:
        raise BackendUnavailable(f"TensorRT is not installed here ({e.__cause__}). Install it with: {GPU_HINT}") from e


def import_cudart():
    """cuda-python's runtime bindings (`cuda.bindings.runtime`), or BackendUnavailable."""
    try:
        return require("cuda.bindings.runtime", "gpu")
    except BackendUnavailable as e:
        raise BackendUnavailable(f"cuda-python is not installed here ({e.__cause__}). Install it with: {GPU_HINT}") from e


def cuda_call(cudart, result, what: str):
    """Unpack a cuda-python `(error, *values)` result; RuntimeError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


def device_info(device: int = 0) -> dict[str, str]:
    """{"gpu": name, "sm": "major.minor"} of a CUDA device (what engines are specific to)."""
    cudart = import_cudart()
    count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount (is there an NVIDIA GPU and driver?)")
    if count <= device:
        raise RuntimeError(f"CUDA device {device} requested, {count} present")
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name, "sm": f"{prop.major}.{prop.minor}"}


def bind_io(trt, engine, spec: GraphSpec, hint: str) -> tuple[dict[str, np.dtype], dict[str, tuple]]:
    """Check an engine's IO against `spec`; returns ({name: numpy dtype}, {input: (min, max) shapes}).

    Names, directions and dtypes must equal the spec's and static dims must match; dynamic dims
    take their limits from the engine's profile 0 (what it was built for, specs' min..max).
    """
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = [*spec.input_names, *spec.output_names]
    if sorted(names) != sorted(want):
        raise ValueError(f"{spec.name} engine has IO {sorted(names)}, specs.{spec.name} expects {sorted(want)}: {hint}")
    dtypes, limits = {}, {}
    for t in (*spec.inputs, *spec.outputs):
        is_input = t.name in spec.input_names
        if (engine.get_tensor_mode(t.name) == trt.TensorIOMode.INPUT) != is_input:
            raise ValueError(f"{spec.name} engine: {t.name} should be an {'input' if is_input else 'output'}: {hint}")
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(t.name)))
        if dtype != np.dtype(t.dtype):
            raise ValueError(f"{spec.name} engine: {t.name} is {dtype}, specs.{spec.name} says {t.dtype}: {hint}")
        shape = tuple(engine.get_tensor_shape(t.name))
        static_ok = all(isinstance(d, str) or d == e for d, e in zip(t.shape, shape))
        if len(shape) != len(t.shape) or not static_ok:
            raise ValueError(f"{spec.name} engine: {t.name} has shape {shape}, spec {t.shape}: {hint}")
        dtypes[t.name] = dtype
        if is_input and any(isinstance(d, str) for d in t.shape):
            lo, _, hi = engine.get_tensor_profile_shape(t.name, 0)
            limits[t.name] = (tuple(lo), tuple(hi))
    return dtypes, limits


def check_shape(spec: GraphSpec, name: str, shape: tuple, limits: dict) -> None:
    """ValueError naming the dim and the limit when `shape` is outside the engine's profile."""
    want = next(t.shape for t in spec.inputs if t.name == name)
    if len(shape) != len(want):
        raise ValueError(f"{spec.name}: input {name} has shape {shape}, expected rank {len(want)} {want}")
    lo, hi = limits.get(name, (want, want))
    for i, (d, dim) in enumerate(zip(shape, want)):
        label = f"dim {i} ({dim})" if isinstance(dim, str) else f"dim {i}"
        if d < lo[i]:
            raise ValueError(f"{spec.name}: input {name} {label} = {d} is below the engine profile's min {lo[i]}")
        if d > hi[i]:
            raise ValueError(f"{spec.name}: input {name} {label} = {d} is above the engine profile's max {hi[i]} "
                             f"(profiles: specs.{spec.name}.profiles)")


class TrtGraph:
    """`run(feeds) -> outputs` on a TensorRT engine; numpy in, numpy out; IO from `spec`."""

    def __init__(self, engine_path: str | Path, spec: GraphSpec, *, rebuild: str = "rebuild the engines"):
        trt, self.cudart = import_tensorrt(), import_cudart()
        self.spec, self.path = spec, Path(engine_path)
        if not self.path.is_file():
            raise StaleEngineError(f"{self.path} is missing: {rebuild}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:  # another TensorRT release or GPU; TensorRT logged why
            raise StaleEngineError(f"TensorRT could not deserialize {self.path}: {rebuild}")
        self.dtypes, self.limits = bind_io(trt, self.engine, spec, rebuild)
        self.context = self.engine.create_execution_context()
        self.stream = cuda_call(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for tensor `name` (grown, never shrunk)."""
        ptr, size = self.buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                cuda_call(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
            size = max(nbytes, 256)  # zero-size tensors still need a valid address
            ptr = int(cuda_call(self.cudart, self.cudart.cudaMalloc(size), f"cudaMalloc({size}) for {name}"))
            self.buffers[name] = (ptr, size)
        return ptr

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        if nbytes:
            cuda_call(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = self.cudart.cudaMemcpyKind
        hosts = []  # the contiguous host inputs, alive until the stream is synchronised
        for name in self.spec.input_names:
            x = np.asarray(feeds[name])
            if x.dtype != self.dtypes[name]:
                raise TypeError(f"{self.spec.name}: input {name} is {x.dtype}, the engine takes {self.dtypes[name]}")
            x = np.ascontiguousarray(x)
            check_shape(self.spec, name, x.shape, self.limits)
            if not self.context.set_input_shape(name, x.shape):
                raise ValueError(f"{self.spec.name}: TensorRT refused shape {x.shape} for {name}")
            ptr = self._buffer(name, x.nbytes)
            self.context.set_tensor_address(name, ptr)
            self._copy(ptr, x.ctypes.data, x.nbytes, kinds.cudaMemcpyHostToDevice)
            hosts.append(x)
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # none of the specs' graphs has data-dependent output shapes
                raise RuntimeError(f"{self.spec.name}: output {name} has an unresolved shape {shape}")
            out = np.empty(shape, self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outputs[name] = out
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.path}")
        for name, out in outputs.items():
            self._copy(out.ctypes.data, self.buffers[name][0], out.nbytes, kinds.cudaMemcpyDeviceToHost)
        cuda_call(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        if self.context is None:
            return
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.cudart.cudaStreamDestroy(self.stream)
        self.buffers, self.context, self.engine = {}, None, None
