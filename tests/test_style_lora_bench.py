"""benchmarks/fidelity/style_lora.py on the demo at tiny settings: a style LoRA trained on the softmax
teacher, saved in diffusers' format, applied to the teacher and to the converted demo (the session's
`converted` folder), and the style effect measured on both."""

from __future__ import annotations

import json

import pytest

from helpers import fidelity_module


@pytest.mark.slow  # a few seconds: it trains, loads and samples five models
def test_style_lora_measures_the_effect_on_teacher_and_conversion(converted, tmp_path, capsys):
    from safetensors import safe_open

    style = fidelity_module("style_lora")
    out, keep = tmp_path / "style.json", tmp_path / "style"
    argv = ["--demo", "--converted", str(converted[0]), "--train-steps", "2", "--samples", "2", "--sampling-steps", "2",
            "--threads", "1", "--save-style", str(keep), "--out", str(out)]  # fmt: skip
    assert style.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["training"]["targets"] == 30  # 3 blocks x (attn1 4 + attn2 4 + ffn 2)
    with safe_open(str(keep / style.STYLE_FILE), framework="pt") as f:  # diffusers' LoRA layout
        keys = list(f.keys())
    assert len(keys) == 60 and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
    assert doc["active_adapters_after_load"] == ["hla_lora", "style"]
    e_t, e_c = doc["effect_teacher"], doc["effect_converted"]
    means = doc["mean_rgb"]
    assert e_t[0] == means["teacher+style"][0] - means["teacher"][0] != 0  # the LoRA moved the teacher's colours
    assert e_c[0] == means["converted+style"][0] - means["converted"][0] != 0
    assert means["converted"] != means["teacher"]  # the converted model is not the teacher...
    assert doc["teacher_mode_vs_teacher_max_abs"] == 0.0  # ...but its teacher mode is, style loaded or not
    assert doc["passed"] == (doc["rel_error"] <= 0.10)
    assert "rel" in capsys.readouterr().err
