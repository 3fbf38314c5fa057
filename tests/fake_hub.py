"""A Hugging Face Hub in memory, for huggingface_hub's own client: the tests run its real snapshot_download.

`FakeHub` answers huggingface_hub's HTTP requests (repo info, the file tree, each file's metadata and bytes) from a
local folder, through httpx2's MockTransport installed as huggingface_hub's client, with the Hub's error answers
(gated, not found, unauthorised) and dropped connections on demand. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Serves `folder` as the model repo `repo_id`. `refuse`: answer every request as the Hub does for a "gated"
    repo without access, a "missing" repo (or one the token cannot see), an "unauthorised" (invalid) token, or "down"
    (no connection at all). `drop`: file names whose download loses its connection mid-way (every try)."""

    repo_id: str
    folder: Path
    refuse: str = ""
    drop: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def downloads(self) -> list[str]:
        """The files whose bytes were asked for (GET), in order."""
        prefix = f"GET /{self.repo_id}/resolve/{COMMIT}/"
        return [r[len(prefix):] for r in self.requests if r.startswith(prefix)]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if self.refuse == "down":
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if self.refuse:
            status, code, message = {"gated": (403, "GatedRepo", "Access to this model is restricted"),
                                     "missing": (401, "RepoNotFound", "Repository not found"),
                                     "unauthorised": (401, "", "Invalid credentials in Authorization header"),
                                     }[self.refuse]
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            return httpx2.Response(status, headers=headers, json={"error": message}, request=request)
        if path == f"/api/models/{self.repo_id}/revision/main":
            return httpx2.Response(200, json={"id": self.repo_id, "sha": COMMIT, "private": False}, request=request)
        if path == f"/api/models/{self.repo_id}/tree/{COMMIT}":
            tree = [{"type": "file", "path": name, "size": (self.folder / name).stat().st_size,
                     "oid": self._etag(name)} for name in self.files()]
            return httpx2.Response(200, json=tree, request=request)
        match = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)", path)
        if match and (self.folder / match.group(1)).is_file():
            return self._file(request, match.group(1))
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "no such file"},
                               request=request)

    def _etag(self, name: str) -> str:
        return hashlib.sha1((self.folder / name).read_bytes()).hexdigest()

    def _file(self, request: httpx2.Request, name: str) -> httpx2.Response:
        data = (self.folder / name).read_bytes()
        headers = {"ETag": f'"{self._etag(name)}"', "X-Repo-Commit": COMMIT, "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers, request=request)
        if name in self.drop:
            raise httpx2.ReadError("connection reset by peer", request=request)
        return httpx2.Response(200, headers=headers, content=data, request=request)


@contextmanager
def serving(hub: FakeHub, cache: Path) -> Iterator[FakeHub]:
    """huggingface_hub online, talking to `hub` only, with its cache in `cache`."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = False, str(cache)
    # huggingface_hub's own client settings (its request hook refuses every request in offline mode), our transport
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True,
                                                    event_hooks={"request": [_http.hf_request_event_hook]}))
    try:
        yield hub
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved
        _http.set_client_factory(_http.default_client_factory)

