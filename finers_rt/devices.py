"""Device table for `plan` (memory bandwidth, dense peak math rates, each with its source) and a
one-time probe of this machine's CPU (numpy copy bandwidth, numpy float32 GEMM rate).

Datasheet peaks are DENSE (NVIDIA quotes tensor rates "with sparsity" at 2x; those are halved
here). Values marked "derived" are computed from the datasheet's core counts and clocks, not
printed in it.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Spec:
    value: float
    source: str


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    bandwidth_gbs: Spec  # memory bandwidth, GB/s (1e9 bytes/s)
    peak_tflops: dict[str, Spec] = field(default_factory=dict)  # math precision -> dense TFLOP/s
    fp32_only: bool = False  # math and activations run in fp32 whatever the weights (CPU EPs)

    def peak(self, math: str) -> float:
        """Dense TFLOP/s for `math` (fp32, bf16, fp16, fp8, int8)."""
        if self.fp32_only:
            return self.peak_tflops["fp32"].value
        if math not in self.peak_tflops:
            have = ", ".join(sorted(self.peak_tflops))
            raise ValueError(f"{self.name} has no {math} math (datasheet lists {have})")
        return self.peak_tflops[math].value


def _gpu(key, name, bandwidth, source, fp32, bf16, fp8=None, int8=None, derived="") -> Device:
    src = source + (f" ({derived})" if derived else "")
    peaks = {"fp32": Spec(fp32, src + ", FP32 (non-tensor)"),
             "bf16": Spec(bf16, src + ", BF16 tensor dense"), "fp16": Spec(bf16, src + ", FP16 tensor dense")}
    if fp8 is not None:
        peaks["fp8"] = Spec(fp8, source + ", FP8 tensor dense")
    if int8 is not None:
        peaks["int8"] = Spec(int8, src + ", INT8 tensor dense (TOPS)")
    return Device(key, name, Spec(bandwidth, source + ", memory bandwidth"), peaks)


A100_DS = "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"
H100_DS = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)"
H200_DS = "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM)"
L40S_DS = "NVIDIA L40S GPU datasheet"
ORIN_AGX_DS = "NVIDIA Jetson AGX Orin Series data sheet (AGX Orin 64GB)"
ORIN_NX_DS = "NVIDIA Jetson Orin NX Series data sheet (Orin NX 16GB)"

DEVICES: dict[str, Device] = {
    "a100": _gpu("a100", "A100 SXM4 80GB", 2039, A100_DS, fp32=19.5, bf16=312, int8=624),
    "h100": _gpu("h100", "H100 SXM5 80GB", 3350, H100_DS, fp32=67, bf16=989.4, fp8=1978.9, int8=1978.9),
    "h200": _gpu("h200", "H200 SXM 141GB", 4800, H200_DS, fp32=67, bf16=989.4, fp8=1978.9, int8=1978.9),
    "l40s": _gpu("l40s", "L40S 48GB", 864, L40S_DS, fp32=91.6, bf16=362.05, fp8=733, int8=733),
    # Orin GPUs: the data sheets give sparse INT8 TOPS and core counts/clocks; dense tensor rates
    # are derived (sparse / 2; FP16 = INT8 / 2; Ampere GA10B: 512 dense FP16 FLOP/clk/tensor core).
    "orin-agx": _gpu("orin-agx", "Jetson AGX Orin 64GB", 204.8, ORIN_AGX_DS, fp32=5.3, bf16=42.5, int8=85,
                     derived="derived: GPU 170 sparse INT8 TOPS / 2; FP16 = INT8 / 2; FP32 = 2048 cores x 2 x 1.3 GHz"),
    "orin-nx": _gpu("orin-nx", "Jetson Orin NX 16GB", 102.4, ORIN_NX_DS, fp32=1.88, bf16=15.0, int8=30,
                    derived="derived: 32 tensor cores x 512 FLOP/clk x 918 MHz; FP32 = 1024 cores x 2 x 918 MHz; unsure"),
}


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s: best of `repeats` np.copyto of `mib` MiB, counting read + write
    bytes (as STREAM's Copy does; write-allocate traffic is not counted)."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def measure_gemm(n: int = 2048, repeats: int = 3) -> float:
    """float32 matmul rate in GFLOP/s: best of `repeats` (n x n) @ (n x n), 2*n^3 FLOPs each,
    on every thread numpy's BLAS uses."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    out = a @ b  # warm-up: BLAS threads, page faults
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_model() -> str:
    """The `model name` line of /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def measure_cpu() -> Device:
    """This machine as a plan device, measured once per process (~1 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bw, gemm = measure_bandwidth(), measure_gemm()
    name = f"this CPU: {cpu_model()}, {cores} cores"
    return Device(
        "cpu", name,
        Spec(round(bw, 2), "measured: numpy copy of 256 MiB, read+write bytes, best of 5"),
        {"fp32": Spec(round(gemm / 1e3, 4), "measured: numpy float32 2048^3 matmul, best of 3")},
        fp32_only=True,
    )


def get_device(key: str) -> Device:
    """A table device, or `cpu`: this machine, measured."""
    if key == "cpu":
        return measure_cpu()
    try:
        return DEVICES[key]
    except KeyError:
        raise ValueError(f"unknown device {key!r}; choose one of {sorted(DEVICES) + ['cpu']}") from None
