"""Publishing a finished conversion on the Hugging Face Hub: `push_output(DIR, "ORG/NAME")`.

`create_repo` then `upload_folder` of the conversion's files (adapter, hla_config.json, recipe,
drift report, sample media, model card; hub.HUB_FILES). A conversion whose drift check failed is
refused unless force=True. Here, not in hub, because it reads the output folder (io.output), which
itself resolves Hub IDs through hub (docs/architecture.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import first_line
from ..user_files import MAX_CARD_BYTES, read_text_file
from .adapter import ADAPTER_FILE, CONFIG_FILE
from .checks import looks_like_hub_id, shown
from .hub import (
    HUB_FILES,
    SAMPLE_PATTERN,
    SAMPLE_SUFFIXES,
    HubError,
    card_for_repo,
    check_card,
)
from .converted import read_output
from .output_guard import SUBFOLDERS


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
    names += [f"{sub}/{n}" for sub in SUBFOLDERS for n in (ADAPTER_FILE, CONFIG_FILE) if (out / sub / n).is_file()]  # a second expert's adapter
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
                (stage / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(out / name, stage / name)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=stage, revision=revision, commit_message=message)
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise HubError(f"could not push to {repo_id!r} on the Hugging Face Hub: {first_line(exc)}") from None
    return PushResult(repo_id, str(repo), commit.commit_url, commit.oid, revision, names)


__all__ = ["PushResult", "files_to_push", "push_output"]
