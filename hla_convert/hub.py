"""The Hugging Face Hub: conversions by Hub ID, and publishing one.

- `resolve_output_dir("ORG/NAME", revision)`: the local folder of a conversion published on the
  Hub, through huggingface_hub's cache (`snapshot_download`: HF_HUB_CACHE, HF_HUB_OFFLINE and
  revision pinning behave as for any Hub model). An existing local folder is returned as it is.
  `load_adapter`, `load_converted`, `validate` and `sample` take either.
- `push_output(DIR, "ORG/NAME")`: `create_repo` then `upload_folder` of the conversion's files
  (adapter, hla_config.json, recipe, drift report, sample media, model card). A conversion whose
  drift check failed is refused unless force=True.

Only the files a conversion consists of are downloaded or uploaded (HUB_FILES); the work folder,
lock and manifest never leave the machine. Errors are HubError (an InputError): one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, first_line

# What a conversion on the Hub consists of; sample media are whatever `sample` wrote as sample.*.
HUB_FILES = ("adapter_model.safetensors", "hla_config.json", "recipe.yaml", "drift_report.json", "README.md")
SAMPLE_PATTERN = "sample.*"
SAMPLE_SUFFIXES = (".mp4", ".gif", ".png")
# The card's placeholders for where the conversion lives; a pushed card names the repository.
FOLDER_PLACEHOLDER = "<this folder>"
PIPELINE_TAGS = ("text-to-video", "image-to-video", "video-to-video")


class HubError(InputError):
    """A Hub repository that cannot be read or written; the message is one line saying why."""


def is_hub_id(ref: str | os.PathLike) -> bool:
    """`ref` is shaped like owner/name and is not an existing local path."""
    from .checks import looks_like_hub_id

    text = str(ref)
    try:
        if Path(os.path.expanduser(text)).exists():
            return False
    except (OSError, ValueError):
        return False
    return looks_like_hub_id(text)


def resolve_output_dir(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a conversion: `ref` itself when it is a local path (or not a Hub ID:
    then reading it says what is wrong), else the Hub repository's snapshot in the local cache
    (downloaded when missing and the Hub is reachable).

    revision: branch, tag or commit of a Hub repository (default: main); refused for a local folder.
    """
    if not is_hub_id(ref):
        if revision is not None:
            raise HubError(f"--revision applies to Hub IDs, not to the local folder {ref}")
        return Path(ref)
    return Path(_snapshot(str(ref), revision))


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=[*HUB_FILES, SAMPLE_PATTERN])
    except RevisionNotFoundError:
        raise HubError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubError(
            f"{repo_id!r} is neither a local folder nor a model on the Hugging Face Hub (a private or gated one needs `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(
            f"{repo_id!r}{at} is neither a local folder nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}; "
            "download it once online, or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(f"could not fetch {repo_id!r}{at} from the Hugging Face Hub: {first_line(exc)}") from None


# -- the model card ----------------------------------------------------------------------------


def check_card(text: str) -> Any:
    """Parse a model card with huggingface_hub's ModelCard and check its front matter offline (the
    Hub's own validation, `ModelCard.validate`, needs the network): library_name, tags, a
    pipeline_tag the Hub knows for video models, base_model as Hub IDs. Returns the ModelCard."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import ModelCardData

    from .checks import looks_like_hub_id

    if not text.startswith("---\n"):
        raise HubError("the model card has no YAML front matter (a README.md starting with ---)")
    try:
        card = ModelCard(text)
    except ValueError as exc:
        raise HubError(f"the model card's front matter is not valid: {first_line(exc)}") from None
    data = card.data
    if not isinstance(data, ModelCardData):
        raise HubError("the model card's front matter is not model-card metadata")
    if not isinstance(data.library_name, str) or not data.library_name:
        raise HubError("the model card's front matter has no library_name")
    if not data.tags or not all(isinstance(t, str) and t for t in data.tags):
        raise HubError("the model card's front matter has no tags (a list of strings)")
    if data.pipeline_tag not in PIPELINE_TAGS:
        raise HubError(f"the model card's pipeline_tag {data.pipeline_tag!r} is not one of {', '.join(PIPELINE_TAGS)}")
    bases = data.base_model if isinstance(data.base_model, list) else [data.base_model] if data.base_model else []
    bad = [b for b in bases if not (isinstance(b, str) and looks_like_hub_id(b))]
    if bad:
        raise HubError(f"the model card's base_model {bad[0]!r} is not a Hub ID (owner/name)")
    if bases and data.to_dict().get("base_model_relation") not in (None, "adapter", "finetune", "merge", "quantized"):
        raise HubError("the model card's base_model_relation is not one of adapter, finetune, merge, quantized")
    return card


def card_for_repo(text: str, repo_id: str) -> str:
    """The card as published: its "<this folder>" placeholders name the repository."""
    return text.replace(FOLDER_PLACEHOLDER, repo_id)


# -- push --------------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    url: str  # the repository
    commit_url: str
    commit: str  # the commit's sha
    revision: str | None
    files: list[str]


def files_to_push(out: Path) -> list[str]:
    """The conversion's files in `out` (HUB_FILES and sample media), by name."""
    names = [n for n in HUB_FILES if (out / n).is_file()]
    names += sorted(p.name for p in out.glob(SAMPLE_PATTERN) if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES)
    return names


def push_output(
    out_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    force: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Publish a finished conversion to the Hub repository `repo_id` (created when missing).

    Refused (HubError, OutputError) before any network call: a folder that is not a finished
    conversion, one whose files are not the ones its manifest lists (edited since, or no manifest),
    one whose drift report did not pass (unless force), a card whose front matter the
    Hub would not read (check_card). revision: a branch, created from main when missing.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .checks import looks_like_hub_id, shown
    from .output import read_output
    from .user_files import MAX_CARD_BYTES, read_text_file

    if not looks_like_hub_id(str(repo_id)):
        raise HubError(f"--repo-id {shown(repo_id)} is not a Hub ID of the form owner/name")
    out = Path(out_dir)
    _, _, report = read_output(out, require_manifest=True)  # the files as the run wrote them (manifest hashes)
    passed = report.get("passed")
    if passed is not True and not force:
        failures = "; ".join(str(f) for f in report.get("failures") or [])
        state = "did not pass" if passed is False else "has no verdict"
        raise HubError(f"{out}: the drift report {state}{f' ({failures})' if failures else ''}; pass --force to publish it anyway")
    names = files_to_push(out)
    card = card_for_repo(read_text_file(out / "README.md", f"{out}/README.md", MAX_CARD_BYTES, HubError), repo_id)
    check_card(card)
    api = HfApi(token=token)
    message = commit_message or f"hla-convert: {', '.join(names)}"
    with tempfile.TemporaryDirectory(prefix="hla-push-") as tmp:
        stage = Path(tmp)
        for name in names:
            if name == "README.md":
                (stage / name).write_text(card, encoding="utf-8")
            else:
                shutil.copyfile(out / name, stage / name)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=stage, revision=revision, commit_message=message)
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise HubError(f"could not push to {repo_id!r} on the Hugging Face Hub: {first_line(exc)}") from None
    return PushResult(repo_id, str(repo), commit.commit_url, commit.oid, revision, names)


__all__ = [
    "HUB_FILES",
    "HubError",
    "PushResult",
    "card_for_repo",
    "check_card",
    "files_to_push",
    "is_hub_id",
    "push_output",
    "resolve_output_dir",
]
