"""The six FineRS prompt templates and the Qwen2.5-VL chat rendering.

The template strings are the reference script's, character for character: sentences are joined
with no space, `{Q}` is the raw question, `{OPTIONS}` the annotation's options as Python's
`str.format` renders them. Nothing else in a template is a format field (the JSON examples contain
braces), so substitution is literal `str.replace`, never `str.format`.
"""
from __future__ import annotations

import re

from .config import TASKS

_FORMAT = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
_GSE_HEAD = (
    "Based on the '{Q}', identify a 256*256 bounding box that best localizes the region most "
    "relevant to the query. "
)
_GSE_TAIL = (
    "Compare the difference between regions and find the most closely matched one."
    + _FORMAT
    + "Output the 256*256 region bbox and the final response inside the interested object in "
    "JSON format.i.e., <think> thinking process here </think><answer>{'bbox': "
    "[x_min,y_min,x_min+256,y_min+256], 'response': "
)
_LPR_HEAD = "Please find '{Q}' with bbox and points. "
_LPR_TAIL = (
    "Compare the difference between objects and find the most closely matched one."
    + _FORMAT
    + "Output the one bbox and points of two largest inscribed circles inside the interested "
    "object in JSON format.i.e., <think> thinking process here </think><answer>{'bbox': "
    "[10,100,200,210], 'points_1': [30,110], 'points_2': [35,180], response: "
)
# The task-specific second sentence, shared by both stages.
_ASK = {
    "referring": "And respond with whether the object is found.",
    "reasoning": "And give me a final response with a word or phrase.",
    "option": "And give me a correct option from {OPTIONS}.",
}
# The example answer that closes each template (LPR's open-ended one has a space before "}").
_GSE_EXAMPLE = {
    "referring": "'The object is found.'}</answer>",
    "reasoning": "'The object is found.'}</answer>",
    "option": "'A'}</answer>",
}
_LPR_EXAMPLE = {
    "referring": "'The object is found.'}</answer>",
    "reasoning": "'The object is white.' }</answer>",
    "option": "'A'}</answer>",
}

TEMPLATES: dict[str, str] = {}
for _task in TASKS:
    TEMPLATES[f"gse:{_task}"] = _GSE_HEAD + _ASK[_task] + _GSE_TAIL + _GSE_EXAMPLE[_task]
    TEMPLATES[f"lpr:{_task}"] = _LPR_HEAD + _ASK[_task] + _LPR_TAIL + _LPR_EXAMPLE[_task]

SYSTEM_MESSAGE = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def format_options(options) -> str:
    """Options as the reference renders them: `"{}".format(options)` (a list shows as its repr)."""
    return "{}".format(options)


def build_question(stage: str, task: str, question: str, options=None) -> str:
    """The user text for `stage` ("gse" | "lpr") and `task`, with the question substituted."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "option" and options is None:
        raise ValueError("task 'option' needs options (e.g. \"['A. red', 'B. blue']\")")
    if task != "option" and options is not None:
        raise ValueError(f"options are only used by task 'option', not {task!r}")
    fields = {"{Q}": question, "{OPTIONS}": format_options(options) if task == "option" else ""}
    # One pass, so a question that contains "{OPTIONS}" (or options that contain "{Q}") stays as typed.
    return _FIELD.sub(lambda m: fields[m.group(0)], TEMPLATES[f"{stage}:{task}"])


_FIELD = re.compile(r"\{Q\}|\{OPTIONS\}")

def render_chat(user_text: str) -> str:
    """Qwen2.5-VL chat template for one user turn (image first, then text) + generation prompt.

    Equal to `processor.apply_chat_template(..., add_generation_prompt=True)` with the official
    template and its default system message; the single `<|image_pad|>` is expanded to one token
    per merged patch by the processor / tokenisation step.
    """
    return (
        f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}{user_text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
