"""Publishing a conversion (`hla-convert push`) and loading it by Hub ID (load_adapter,
load_converted, `hla-convert validate ORG/NAME`), without a network.

The push goes through huggingface_hub (create_repo, create_branch, upload_folder) with only its
HTTP transport replaced by tests/hub_standin.py; loading by ID goes through huggingface_hub's
snapshot_download with HF_HUB_OFFLINE set and HF_HUB_CACHE pointing at a folder laid out as its
cache (written by the stand-in from what was pushed). Not exercised: the real Hub's answers, the
LFS / Xet upload of large files, downloads of files missing from the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hub_standin import HubStandIn
from helpers import assert_one_line_error, invoke, relist
from tiny_models import forward

REPO = "my-org/demo-hla"


@pytest.fixture(scope="module")
def converted(converted) -> Path:
    """The session's demo conversion (conftest), as its folder. Read only here: a test that changes
    it works on a copy (with_verdict)."""
    return converted[0]


def with_verdict(src: Path, dst: Path, passed: bool | None, listed: bool = True) -> Path:
    """A copy of a conversion whose drift report says `passed`; listed in the manifest with its new
    hash as a run that wrote it would (listed=False: an edit made after the run)."""
    shutil.copytree(src, dst)
    report = json.loads((dst / "drift_report.json").read_text())
    report["passed"] = passed
    report["failures"] = [] if passed else ["output relative L2 0.9 > 0.27"]
    (dst / "drift_report.json").write_text(json.dumps(report))
    if listed:
        relist(dst, "drift_report.json")
    return dst


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    standin = HubStandIn(tmp_path / "hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(standin.cache_dir))
    # online towards the stand-in even where the caller's shell has HF_HUB_OFFLINE=1 (the stand-in
    # replaces the transport: nothing reaches a network); offline() below turns it back on
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    standin.install()
    yield standin
    standin.uninstall()


def offline(monkeypatch, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- the model card ------------------------------------------------------------------------------


def test_the_card_front_matter_follows_the_hub_conventions(converted):
    from hla_convert.io.adapter import read_adapter_info
    from hla_convert.io.hub import HubError, check_card
    from hla_convert.io.model_card import model_card

    card = check_card((converted / "README.md").read_text())
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    assert "hla-convert" in card.data.tags and card.data.base_model is None  # the demo is no Hub model
    info = read_adapter_info(converted)
    info = {**info, "base_source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "extra": {**info["extra"], "pipeline_class": "WanPipeline"}}
    report = json.loads((converted / "drift_report.json").read_text())
    hub_card = check_card(model_card(info, report))
    assert hub_card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert hub_card.data.to_dict()["base_model_relation"] == "adapter"
    i2v = {**info, "extra": {**info["extra"], "pipeline_class": "WanImageToVideoPipeline"}}
    assert check_card(model_card(i2v, report)).data.pipeline_tag == "image-to-video"
    local = check_card(model_card({**info, "base_source": "/data/wan-pipe"}, report))
    assert local.data.base_model is None  # a local path is not linked as a Hub model
    text = model_card(info, report)
    for bad, message in (
        (text.replace("pipeline_tag: text-to-video", "pipeline_tag: text-to-image-ish"), "pipeline_tag"),
        (text.replace("base_model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "base_model: /abs/path"), "not a Hub ID"),
        (text.replace("library_name: diffusers\n", ""), "library_name"),
        (text.replace("---\n", "", 1), "no YAML front matter"),
        ("---\n- a list\n---\n", "not valid"),
    ):
        with pytest.raises(HubError, match=message):
            check_card(bad)


# -- push ----------------------------------------------------------------------------------------


def test_push_uploads_the_conversion_and_its_card_names_the_repo(converted, tmp_path, hub):
    from hla_convert.io.sampling import add_to_output, encode_outputs, sample_side_by_side
    from hla_convert.io.converted import read_output

    folder = with_verdict(converted, tmp_path / "passed", True)
    result = sample_side_by_side(folder, steps=2, device="cpu")
    info, _, report = read_output(folder)
    add_to_output(folder, info, report, encode_outputs(result, folder / "sample.gif"), result)
    doc = json.loads(invoke("push", folder, "--repo-id", REPO, "--private", "--revision", "v1", "--json").stdout)
    assert doc["exit_code"] == 0, doc
    assert hub.repos[REPO]["visibility"] == "private" and "v1" in hub.branches[REPO]
    (commit,) = hub.commits
    expected = ["adapter_model.safetensors", "hla_config.json", "recipe.yaml", "drift_report.json", "README.md", "sample.gif", "sample.png"]
    assert sorted(commit.files) == sorted(expected) and doc["files"] == expected
    assert (commit.repo_id, commit.revision, doc["commit"], doc["revision"]) == (REPO, "v1", commit.sha, "v1")
    for name in expected[:-3] + expected[-2:]:
        assert commit.files[name] == (folder / name).read_bytes(), name  # byte for byte, LFS-free
    card = commit.files["README.md"].decode()
    assert f'load_converted("{REPO}")' in card and "<this folder>" not in card and "](sample.png)" in card
    assert hub.validated == [card]  # huggingface_hub sent the card's metadata to the Hub's check
    assert "<this folder>" in (folder / "README.md").read_text()  # the local card is left as it was
    # pushing again to an existing repo is a new commit, not an error
    assert invoke("push", folder, "--repo-id", REPO).exit_code == 0 and len(hub.commits) == 2


def test_push_refuses_a_failed_drift_report_unless_forced(converted, tmp_path, hub):
    folder = with_verdict(converted, tmp_path / "failed", False)
    line = assert_one_line_error(invoke("push", folder, "--repo-id", REPO), contains="did not pass")
    assert "output relative L2 0.9 > 0.27" in line and "--force" in line
    assert hub.requests == []  # refused before anything was sent
    assert invoke("push", folder, "--repo-id", REPO, "--force").exit_code == 0
    assert len(hub.commits) == 1 and hub.repos[REPO]["visibility"] == "public"


def test_push_refuses_files_edited_after_the_run_and_a_folder_without_manifest(converted, tmp_path, hub):
    failed = with_verdict(converted, tmp_path / "failed", False)
    edited = with_verdict(failed, tmp_path / "edited", True, listed=False)  # "passed": true written over a failed run
    line = assert_one_line_error(invoke("push", edited, "--repo-id", REPO, "--force"), contains="drift_report.json was changed")
    assert "sha256" in line
    bare = with_verdict(converted, tmp_path / "bare", True)
    (bare / ".hla-convert-manifest.json").unlink()
    assert_one_line_error(invoke("push", bare, "--repo-id", REPO), contains="has no .hla-convert-manifest.json")
    assert hub.requests == []  # refused before anything was sent


def test_push_bad_input_is_one_line(converted, tmp_path, hub):
    folder = with_verdict(converted, tmp_path / "passed", True)
    assert_one_line_error(invoke("push", folder, "--repo-id", "not a repo id"), contains="not a Hub ID")
    assert_one_line_error(invoke("push", tmp_path / "nowhere", "--repo-id", REPO), contains="does not exist")
    assert_one_line_error(invoke("push", folder), contains="--repo-id")
    (folder / "README.md").write_text("no front matter\n")
    assert_one_line_error(invoke("push", folder, "--repo-id", REPO), contains="front matter")
    assert hub.requests == []


# -- loading by Hub ID -----------------------------------------------------------------------------


def test_load_by_hub_id_from_the_offline_cache(converted, tmp_path, hub, monkeypatch):
    from hla_convert import load_adapter, load_converted
    from hla_convert.io.hub import HubError
    from hla_convert.model.loading import load_demo_model
    from hla_convert.io.sampling import demo_inputs
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = with_verdict(converted, tmp_path / "passed", True)
    assert invoke("push", folder, "--repo-id", REPO).exit_code == 0
    (main,) = hub.commits
    # v1: a second commit on a branch, with the adapter's HLA weights changed
    tensors = load_file(folder / "adapter_model.safetensors")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = {k: v + 0.5 if k.endswith("hla.proj") else v for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=meta)
    relist(folder, "adapter_model.safetensors")  # as a second run would have written it
    assert invoke("push", folder, "--repo-id", REPO, "--revision", "v1").exit_code == 0
    hub.uninstall()
    offline(monkeypatch, hub.cache_dir)  # from here on nothing may reach a network

    inputs, _ = demo_inputs(0)
    inputs = {**inputs, "hidden_states": torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(0)), "timestep": torch.tensor([500.0])}
    local = forward(load_converted(converted), inputs)
    by_id = forward(load_converted(REPO), inputs)
    assert torch.equal(local, by_id)
    assert torch.equal(forward(load_converted(REPO, revision=main.sha), inputs), local)  # pinned to a commit
    v1 = forward(load_converted(REPO, revision="v1"), inputs)
    assert not torch.allclose(v1, local)
    assert torch.equal(forward(load_adapter(load_demo_model().transformer, REPO, revision="v1"), inputs), v1)
    for call, message in (
        (lambda: load_converted(REPO, revision="v2"), "at revision 'v2' is neither a local folder nor in the local Hugging Face cache"),
        (lambda: load_converted("nobody/nothing"), "'nobody/nothing' is neither a local folder nor in the local Hugging Face cache"),
        (lambda: load_converted(converted, revision="v1"), "--revision applies to Hub IDs"),
    ):
        with pytest.raises(HubError, match=message) as info:
            call()
        assert "HF_HUB_OFFLINE is set" in str(info.value) or "--revision" in str(info.value)
        assert "\n" not in str(info.value)


def test_validate_a_hub_id_offline(converted, tmp_path, hub, monkeypatch):
    folder = with_verdict(converted, tmp_path / "passed", True)
    assert invoke("push", folder, "--repo-id", REPO).exit_code == 0
    hub.uninstall()
    offline(monkeypatch, hub.cache_dir)
    local = json.loads(invoke("validate", converted, "--device", "cpu", "--json").stdout)
    by_id = json.loads(invoke("validate", REPO, "--device", "cpu", "--json").stdout)
    assert by_id["exit_code"] == local["exit_code"] and by_id["drift"]["table"] == local["drift"]["table"]
    assert_one_line_error(invoke("validate", REPO, "--revision", "nope"), contains="nor in the local Hugging Face cache")
    assert_one_line_error(invoke("validate", "nobody/nothing"), contains="HF_HUB_OFFLINE is set")


def test_a_revision_the_hub_does_not_have_is_one_line(hub, monkeypatch):
    """Online: huggingface_hub's own RevisionNotFound parsing, mapped to our message."""
    from hla_convert.io.hub import HubError, resolve_output_dir

    hub.repos[REPO] = {"visibility": "public"}
    hub.branches[REPO] = {"main"}
    hub.missing_revisions.add("nope")
    with pytest.raises(HubError, match="has no revision 'nope'"):
        resolve_output_dir(REPO, revision="nope")
    with pytest.raises(HubError, match="is neither a local folder nor a model on the Hugging Face Hub"):
        resolve_output_dir("nobody/nothing")


def test_sample_a_hub_id_offline_writes_here(converted, tmp_path, hub, monkeypatch):
    from hla_convert.io.sampling import default_video_suffix

    folder = with_verdict(converted, tmp_path / "passed", True)
    assert invoke("push", folder, "--repo-id", REPO).exit_code == 0
    hub.uninstall()
    offline(monkeypatch, hub.cache_dir)
    monkeypatch.chdir(tmp_path)
    result = invoke("sample", REPO, "--steps", 1, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    video = Path(f"demo-hla-sample{default_video_suffix()}")
    assert json.loads(result.stdout)["files"]["video"] == str(video)
    assert (tmp_path / video).is_file() and (tmp_path / video.with_suffix(".png")).is_file()


def test_push_reads_only_a_regular_readme_of_bounded_size(converted, tmp_path, hub):
    import os

    folder = with_verdict(converted, tmp_path / "passed", True)
    (folder / "README.md").unlink()
    os.mkfifo(folder / "README.md")  # would block the read forever
    assert_one_line_error(invoke("push", folder, "--repo-id", REPO), contains="README.md is a FIFO, not a regular file")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("/dev/zero")  # would be read until memory runs out
    assert_one_line_error(invoke("push", folder, "--repo-id", REPO), contains="README.md is a device, not a regular file")
    assert hub.requests == []
