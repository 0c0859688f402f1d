"""finers-rt: deployment runtime for FineRS (GSE + LPR Qwen2.5-VL stages and SAM2)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Pipeline", "PipelineConfig", "Result", "__version__"]


def __getattr__(name):
    # Lazy: `import finers_rt` stays cheap (the CLI imports it before knowing the backend).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "PipelineConfig":
        from .config import PipelineConfig

        return PipelineConfig
    if name == "Result":
        from .result import Result

        return Result
    raise AttributeError(name)
