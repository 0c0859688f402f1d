"""The one place ONNX Runtime sessions are created: providers checked, IO names checked."""
from __future__ import annotations

import functools
from pathlib import Path

import onnxruntime as ort

from ..specs import GraphSpec

EXPORT_HINT = "rebuild the engine folder with `finers-rt export --checkpoints CKPT --out DIR --overwrite`"


GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


@functools.cache
def _preload_gpu_libraries() -> None:
    """Load the CUDA / cuDNN libraries of pip's nvidia-* packages (`onnxruntime-gpu[cuda,cudnn]`)
    before the first GPU session: they are not on the loader's path, and without them ORT's CUDA
    provider fails to load. Libraries already loadable (system CUDA, LD_LIBRARY_PATH) are used."""
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
        ort.preload_dlls()


def resolve_providers(providers: list, path: Path) -> list:
    """Providers as ORT takes them (names or (name, options) pairs) for the graph at `path`.

    An entry with `for_graph(path)` (e.g. `backends.ort.TensorrtEP`) gives its options for this
    graph: the TensorRT EP's profile shapes and engine cache differ per graph.
    """
    return [p.for_graph(path) if hasattr(p, "for_graph") else p for p in providers]


def _cuda_graph_requested(providers: list) -> bool:
    """True when an entry is ("CUDAExecutionProvider", {..., "enable_cuda_graph": "1"})."""
    return any(not isinstance(p, str) and p[1].get("enable_cuda_graph") == "1" for p in providers)


def open_session(path: str | Path, providers: list | None, spec: GraphSpec | None = None, *,
                 once_per_stage: bool = False) -> ort.InferenceSession:
    """An InferenceSession that really runs on `providers`, with IO names matching `spec`.

    ORT drops a requested provider it does not have (or cannot load, e.g. CUDA without a GPU)
    with a warning and runs on the CPU; here that is an error naming the provider.

    Every session's CPU worker threads stop spinning when a run returns (ORT's default keeps them
    spinning ~60 ms, holding a core that the host work or the next session's run needs). For the
    decoder too: its last step's spin ate into region + LPR vision, and between steps it competed
    with the host's token work (bench shape, 2-core AVX2 EPYC, 6 alternated pipeline runs each:
    GSE decode 1.96 vs 2.20 s, LPR decode 0.96 vs 1.02 s, LPR vision 133 vs 163 ms, end to end
    8.83 vs 9.19 s). Waking the worker for the next step costs microseconds.

    once_per_stage: for graphs run once per stage (vision, SAM2); results are unchanged.
    - No memory pattern: with one, ORT traces the first run's allocations and the second run
      allocates one fresh block for the whole pattern, so two runs (not one) pay first-touch page
      faults (SAM2 hiera-t: ~160k faults, +0.3 s each; GSE vision: ~660k) and the arena keeps both
      (peak RSS 1.6 vs 1.1 GB for SAM2 alone). Without it the arena's blocks from the first run
      are reused: one warm-up run is enough, and steady-state time is the same.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {EXPORT_HINT}")
    providers = resolve_providers(list(providers or ["CPUExecutionProvider"]), path)
    names = [p if isinstance(p, str) else p[0] for p in providers]
    if set(names) & GPU_PROVIDERS:
        _preload_gpu_libraries()
    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            raise RuntimeError(f"ONNX Runtime provider {name} was requested for {path.name} but this "
                               f"onnxruntime build only has {available} (GPU providers: pip install "
                               f"'finers-rt[gpu]' in an environment without plain onnxruntime)")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if once_per_stage:
        options.enable_mem_pattern = False
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT's own error; with CUDA graphs requested, say what to do
        if not _cuda_graph_requested(providers):
            raise
        raise RuntimeError(f"{path}: ONNX Runtime refused the CUDA-graph session ({e}). Capture needs every compute "
                           "node on the CUDA provider: use the float16 GQA decoder (`finers-rt export --precision "
                           "fp16 --decoder-attention gqa`) or load with cuda_graphs=False") from e
    loaded = session.get_providers()
    for name in names:
        if name not in loaded:
            raise RuntimeError(f"ONNX Runtime provider {name} was requested for {path.name} but did not "
                               f"load (loaded: {loaded})")
    if spec is not None:
        io = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if io != (spec.input_names, spec.output_names):
            raise ValueError(f"{path} has IO {io}, expected {spec.input_names} -> {spec.output_names}: {EXPORT_HINT}")
    return session
