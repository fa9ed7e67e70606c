"""The Hugging Face Hub: conversions by Hub ID, and publishing one.

- `resolve_output_dir("ORG/NAME", revision)`: the local folder of a conversion published on the
  Hub, through huggingface_hub's cache (`snapshot_download`: HF_HUB_CACHE, HF_HUB_OFFLINE and
  revision pinning behave as for any Hub model). An existing local folder is returned as it is.
  `load_adapter`, `load_converted`, `validate` and `sample` take either.
- `push_output(DIR, "ORG/NAME")` (in io/push.py, above the output folder it reads): `create_repo` then `upload_folder` of the conversion's files
  (adapter, hla_config.json, recipe, drift report, sample media, model card). A conversion whose
  drift check failed is refused unless force=True.

Only the files a conversion consists of are downloaded or uploaded (HUB_FILES); the work folder,
lock and manifest never leave the machine. Errors are HubError (an InputError): one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError, first_line

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


__all__ = [
    "HUB_FILES",
    "HubError",
    "card_for_repo",
    "check_card",
    "is_hub_id",
    "resolve_output_dir",
]
