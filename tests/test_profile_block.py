"""benchmarks/profile_block.py --smoke on the CPU: every variant and pass profiled on a tiny Wan
block, the groups summing to the total and each variant's attention core found where it runs."""

from __future__ import annotations

import json
import math

import pytest

from helpers import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "profile_block.py"


def _script():
    return load_script(SCRIPT, "profile_block")


def test_smoke_profile_groups_sum_to_the_total_and_find_the_core(tmp_path, capsys):
    prof = _script()
    out = tmp_path / "prof.json"
    assert prof.main([str(out), "--smoke", "--commit", "abc1234"]) == 0
    doc = json.loads(out.read_text())
    recs = {(r["variant"], r["pass"]): r for r in doc["records"]}
    assert set(recs) == {(v, p) for v in prof.VARIANTS for p in prof.PASSES}
    for (variant, pass_), r in recs.items():
        assert list(r["groups"]) == list(prof.GROUPS) and r["commit"] == "abc1234"
        assert r["total_ms"] > 0
        assert math.isclose(sum(g["ms"] for g in r["groups"].values()), r["total_ms"], rel_tol=1e-6)
        assert math.isclose(sum(g["pct"] for g in r["groups"].values()), 100.0, rel_tol=1e-6)
        for group in ("attention core", "QKV+out projections", "FFN", "norms+rope"):
            assert r["groups"][group]["ms"] > 0, (variant, pass_, group)
        names = [o["name"] for o in r["ops"]]
        if variant == "hybrid":  # the HLA core runs (feature maps, the reference op on the CPU), no SDPA of its own in attn1
            assert r["groups"]["feature maps"]["ms"] > 0
        else:  # diffusers' processor: torch's SDPA
            assert r["groups"]["feature maps"]["ms"] == 0
            assert any("scaled_dot_product" in n for n in names)
    # backward ops land in their forward op's group: the projections' backward makes them grow
    for variant in prof.VARIANTS:
        assert recs[(variant, "forward_backward")]["groups"]["QKV+out projections"]["ms"] > 0
    # stage 2's trainables: the hybrid's HLA parameters + LoRA, the softmax side the same LoRA, the kept layer none
    train = {v: recs[(v, "forward_backward")]["trainable_parameters"] for v in prof.VARIANTS}
    assert train["hybrid"] > train["softmax"] > 0 and train["kept"] == 0
    printed = capsys.readouterr().out
    assert "### hybrid forward_backward" in printed and "| copies+casts |" in printed


def test_group_of_an_op_by_name_wins_over_its_region():
    prof = _script()
    assert prof._by_name("aten::_scaled_dot_product_flash_attention") == "attention core"
    assert prof._by_name("hla_kernels::hybrid_forward") == "attention core"
    assert prof._by_name("aten::copy_") == "copies+casts" and prof._by_name("aten::cat") == "copies+casts"
    assert prof._by_name("aten::mm") is None


def test_unknown_variant_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--variants: 'flash'"):
        _script().main([str(tmp_path / "x.json"), "--smoke", "--variants", "flash"])
