"""A local stand-in for the Hugging Face Hub's HTTP API, for tests without a network.

huggingface_hub sends every request through one httpx client made by a factory it lets callers
replace (`huggingface_hub.set_client_factory`): the stand-in installs a client whose transport
answers here instead of over the network. Everything above the transport is huggingface_hub's own
code (create_repo, create_branch, upload_folder: request building, the preupload / commit protocol,
error parsing). Answered: repo creation, branch creation, README metadata validation (parsed
only: the Hub's schema checks are not reproduced), preupload (every file "regular", i.e.
inline in the commit: the LFS / Xet upload path of large files is NOT exercised), commits. A commit
is also written into a Hub cache folder laid out as huggingface_hub's (models--ORG--NAME/refs/REV,
snapshots/SHA/...), so that what was pushed can be loaded by Hub ID offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _httpx():
    """The httpx huggingface_hub uses: its own fork (httpx2) from huggingface_hub 2, httpx before."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx as httpx2
    return httpx2


@dataclass
class Commit:
    repo_id: str
    revision: str
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class HubStandIn:
    cache_dir: Path
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id -> the create payload
    branches: dict[str, set[str]] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    missing_revisions: set[str] = field(default_factory=set)
    validated: list[str] = field(default_factory=list)  # README.md texts sent to /api/validate-yaml

    def handle(self, request: Any) -> Any:
        httpx2 = _httpx()

        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": self.url(repo_id)})
            self.repos[repo_id] = body
            self.branches[repo_id] = {"main"}
            return httpx2.Response(200, json={"url": self.url(repo_id)})
        if path == "/api/validate-yaml":
            # The real Hub checks a README's metadata against its schema here; the stand-in only
            # parses it (huggingface_hub's ModelCard) and records what was sent.
            from huggingface_hub import ModelCard

            content = json.loads(request.content)["content"]
            self.validated.append(content)
            try:
                ModelCard(content)
            except ValueError as exc:
                return httpx2.Response(400, json={"errors": [{"message": str(exc)}], "warnings": []})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        for repo_id in self.repos:
            prefix = f"/api/models/{repo_id}/"
            if not path.startswith(prefix):
                continue
            action, _, revision = path[len(prefix) :].partition("/")
            if action == "branch":
                self.branches[repo_id].add(revision)
                return httpx2.Response(200, json={})
            if revision in self.missing_revisions or revision not in self.branches[repo_id]:
                return httpx2.Response(
                    404, headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, json={"error": "Invalid rev id"}
                )
            if action == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if action == "commit":
                return self.commit(repo_id, revision, request.content)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"})

    def commit(self, repo_id: str, revision: str, body: bytes) -> Any:
        httpx2 = _httpx()

        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(v["value"] for v in lines if v["key"] == "header")
        files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
        sha = hashlib.sha1(body).hexdigest()
        self.commits.append(Commit(repo_id, revision, sha, header["summary"], files))
        self.write_cache(repo_id, revision, sha, files)
        return httpx2.Response(200, json={"commitUrl": f"{self.url(repo_id)}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def write_cache(self, repo_id: str, revision: str, sha: str, files: dict[str, bytes]) -> Path:
        """huggingface_hub's cache layout: refs/REV holds the commit sha, snapshots/SHA the files."""
        storage = self.cache_dir / ("models--" + repo_id.replace("/", "--"))
        snapshot = storage / "snapshots" / sha
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (snapshot / name).write_bytes(data)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(sha)
        return snapshot

    @staticmethod
    def url(repo_id: str) -> str:
        return f"https://huggingface.co/{repo_id}"

    def install(self) -> None:
        httpx2 = _httpx()
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import hf_request_event_hook

        set_client_factory(
            lambda: httpx2.Client(
                transport=httpx2.MockTransport(self.handle), event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True
            )
        )

    @staticmethod
    def uninstall() -> None:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory

        set_client_factory(default_client_factory)
