"""Pipeline configuration: frozen dataclasses and named presets.

Every constant here is a fact about the reference FineRS evaluation script
(`../shared/reference/finers-pipeline.md`); the options that deviate from it are named
after the reference behaviour they replace.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TASKS = ("referring", "reasoning", "option")
REGION_MODES = ("clamp", "shift")
PARSE_MODES = ("reference", "tolerant")

IM_END_ID = 151645  # <|im_end|>: the only EOS the reference generates up to
ENDOFTEXT_ID = 151643  # <|endoftext|>: pad id of the Qwen2.5 tokenizer
IMAGE_PAD_ID = 151655  # <|image_pad|>


@dataclass(frozen=True)
class StageConfig:
    """One VLM stage (GSE or LPR): how its image is prepared and how it generates.

    `coord_space` is the (width, height) the model's coordinates live in: the stage input
    size before Qwen's smart_resize (1920x1080 for GSE, 512x512 for LPR).
    """

    name: str
    input_size: tuple[int, int]  # (width, height) of the PIL BILINEAR resize fed to the processor
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0  # the base Instruct generation_config says 1.05: never inherit it
    eos_token_id: int = IM_END_ID

    @property
    def coord_space(self) -> tuple[int, int]:
        return self.input_size


GSE = StageConfig(name="gse", input_size=(1920, 1080))
LPR = StageConfig(name="lpr", input_size=(512, 512))


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes a Result. Defaults reproduce the reference evaluation script.

    region_mode: "clamp" (reference: each crop edge clamped into the image, the box shrinks at
        borders and never includes the last row/column) or "shift" (the box is moved inside the
        image keeping its size; what training used).
    lpr_channel_swap: True reproduces the reference bug that feeds LPR the crop with R and B
        swapped; False feeds correct RGB (what LPR was trained on).
    parse_mode: "reference" parses model text exactly as the reference (JSON, then a Python
        literal); "tolerant" also accepts unquoted keys such as `response: 'A'`.
    sam2_min_region: side of the smallest region cut from the original image, in pixels.
    """

    gse: StageConfig = GSE
    lpr: StageConfig = LPR
    region_mode: str = "clamp"
    lpr_channel_swap: bool = True
    parse_mode: str = "reference"
    min_region: int = 512
    multimask_output: bool = True

    def __post_init__(self) -> None:
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"region_mode must be one of {REGION_MODES}, got {self.region_mode!r}")
        if self.parse_mode not in PARSE_MODES:
            raise ValueError(f"parse_mode must be one of {PARSE_MODES}, got {self.parse_mode!r}")

    def replace(self, **changes) -> "PipelineConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, PipelineConfig] = {
    # Reproduces the published numbers' pipeline, bugs included.
    "reference": PipelineConfig(),
    # What the models were trained on: RGB crops for LPR and regions shifted inside the frame.
    "corrected": PipelineConfig(region_mode="shift", lpr_channel_swap=False),
}


def preset(name: str) -> PipelineConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
