"""Prompt texts against the reference script's six templates (copied verbatim into tests/data)."""
import json
from pathlib import Path

import pytest

from finers_rt.prompts import TEMPLATES, build_question, render_chat

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_prompts.json").read_text())


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_templates_match_reference_character_for_character(key):
    assert TEMPLATES[key] == REFERENCE[key]


def test_question_substitution_is_literal_and_keeps_case():
    q = "The RED car {x} near 'tower'"
    text = build_question("gse", "referring", q)
    assert text.startswith("Based on the 'The RED car {x} near 'tower'', identify a 256*256")
    assert text.endswith("'response': 'The object is found.'}</answer>")


def test_options_render_as_python_str_format():
    opts = ["A. red", "B. blue"]
    text = build_question("lpr", "option", "What colour?", opts)
    assert "And give me a correct option from ['A. red', 'B. blue'].Compare" in text
    assert build_question("gse", "option", "q", "A/B").count("from A/B.") == 1


def test_substitution_is_single_pass():
    text = build_question("gse", "option", "say {OPTIONS}", ["A. {Q}"])
    assert "Based on the 'say {OPTIONS}'" in text and "from ['A. {Q}']." in text


@pytest.mark.parametrize("task,options", [("option", None), ("referring", ["A. x"]), ("nope", None)])
def test_bad_task_options_are_clear_errors(task, options):
    with pytest.raises(ValueError, match="task|options"):
        build_question("gse", task, "q", options)


def test_chat_rendering_is_qwen25_vl_template_with_default_system():
    assert render_chat("hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
