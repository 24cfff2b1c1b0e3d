"""A loopback Hugging Face Hub: enough of the Hub's HTTP API for the real `huggingface_hub`
client (2.x: `HfApi.model_info`, `snapshot_download`, `hf_hub_download`) pointed at it with
`endpoint=` or `HF_ENDPOINT`.

Repositories are published into a folder: `{root}/models/{repo_id}/refs.json` maps branches
and tags to commits, and `{root}/models/{repo_id}/{commit}/` holds that commit's files. A
commit's 40-hex id is derived from its content, as git's is. Served:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   repo info (`sha`: the commit)
    GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=  file list, paged by Link headers
    HEAD|GET /{repo}/resolve/{rev}/{file}                   a file, or (LFS files, as the Hub
                                                             does) a 302 to /cdn/ on another
                                                             origin (`localhost`): "cdn" mode
    GET  /api/agent-harnesses                               the client's User-Agent registry

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which the client turns into its typed errors. A gated repo's metadata is public
and its files answer 403. No Xet headers are ever sent, so the client downloads over plain
HTTP. `corrupt` names files whose bytes are served altered (same size) while their metadata
keeps the real hashes: what a broken mirror or proxy would do.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from support.loopback import LoopbackServer

COMMIT = re.compile(r"^[0-9a-f]{40}$")
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
LFS_MIN_BYTES = 10 * 1024 * 1024  # the Hub stores bigger files in LFS whatever their suffix
CHUNK = 1 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _File:
    """One file of a commit with the hashes the Hub reports for it."""

    def __init__(self, path: str, location: Path) -> None:
        data = location.read_bytes()
        self.path, self.location, self.size = path, location, len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.lfs = path.lower().endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_BYTES
        if self.lfs:  # git stores a pointer; the Hub names the blob by its sha256
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n"
            ).encode()
            self.oid, self.pointer_size, self.etag = (
                git_blob_sha1(pointer),
                len(pointer),
                self.sha256,
            )
        else:
            self.oid, self.pointer_size = git_blob_sha1(data), None
            self.etag = self.oid


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class HubServer(LoopbackServer):
    """`with HubServer(root) as hub:` serves the repos under `root` at `hub.endpoint`."""

    def __init__(self, root: Path, *, lfs_redirect: str = "cdn", tree_page_size: int = 1000):
        self.root = Path(root)
        self.lfs_redirect = lfs_redirect  # "none": serve LFS files directly; "cdn": 302
        self.tree_page_size = tree_page_size
        self.corrupt: set[str] = set()  # "repo_id/path" served with altered bytes
        self.requests: list[tuple[str, str]] = []  # (method, path) as received
        self._files: dict[tuple[str, str], dict[str, _File]] = {}
        self._lock = threading.Lock()
        super().__init__(self._handler_class(), "127.0.0.1", 0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        refs: tuple[str, ...] = ("main",),
        gated: bool = False,
    ) -> str:
        """Write one commit of `files`, point `refs` at it, return its id."""
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = digest.hexdigest()
        repo = self.root / "models" / repo_id
        for path, data in files.items():
            target = repo / commit / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        refs_file = repo / "refs.json"
        known = json.loads(refs_file.read_text()) if refs_file.is_file() else {}
        refs_file.write_text(json.dumps({**known, **dict.fromkeys(refs, commit)}))
        if gated:
            (repo / "gated").touch()
        return commit

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branches and tags of a published repo -> their commits."""
        return json.loads((self.root / "models" / repo_id / "refs.json").read_text())

    def publish_folder(self, repo_id: str, folder: Path, **options: object) -> str:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.publish(repo_id, files, **options)  # type: ignore[arg-type]

    # -- lookups ------------------------------------------------------------------------

    def _repo(self, repo_id: str, revision: str) -> tuple[Path, str]:
        repo = self.root / "models" / repo_id
        if not (repo / "refs.json").is_file():
            raise _HubError(404, "RepoNotFound", "Repository not found")
        refs = json.loads((repo / "refs.json").read_text())
        commit = revision if COMMIT.match(revision) else refs.get(revision)
        if commit is None or not (repo / commit).is_dir():
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _commit_files(self, repo: Path, commit: str) -> dict[str, _File]:
        with self._lock:
            key = (str(repo), commit)
            if key not in self._files:
                base = repo / commit
                self._files[key] = {
                    p.relative_to(base).as_posix(): _File(p.relative_to(base).as_posix(), p)
                    for p in sorted(base.rglob("*"))
                    if p.is_file()
                }
            return self._files[key]

    # -- HTTP ---------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the client keeps connections alive

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._dispatch(head=True)

            def do_GET(self) -> None:
                self._dispatch(head=False)

            def _dispatch(self, head: bool) -> None:
                parts = urlsplit(self.path)
                path, query = unquote(parts.path), parse_qs(parts.query)
                hub.requests.append((self.command, path))
                try:
                    if path.startswith("/api/"):
                        self._api(path.removeprefix("/api/"), query)
                    elif path.startswith("/cdn/"):
                        self._cdn(path.removeprefix("/cdn/"), head)
                    elif "/resolve/" in path:
                        self._resolve(path.lstrip("/"), head)
                    else:
                        raise _HubError(404, None, f"no route for {path}")
                except _HubError as error:
                    body = json.dumps({"error": error.message}).encode()
                    self.send_response(error.status)
                    self.send_header("Content-Type", "application/json")
                    if error.code:
                        self.send_header("X-Error-Code", error.code)
                    self.send_header("X-Error-Message", error.message)
                    for name, value in error.headers.items():
                        self.send_header(name.replace("_", "-"), value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)

            def _json(self, payload: object, **headers: str) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _api(self, rest: str, query: dict[str, list[str]]) -> None:
                if rest == "agent-harnesses":
                    return self._json({"standardEnvVars": [], "harnesses": {}})
                if not rest.startswith("models/"):
                    raise _HubError(404, None, "unknown api route")
                tail = rest.removeprefix("models/")
                if "/tree/" in tail:
                    repo_id, argument = tail.split("/tree/", 1)
                    revision, _, sub = argument.partition("/")
                    return self._tree(repo_id, revision, sub.strip("/"), query)
                repo_id, _, revision = tail.partition("/revision/")
                repo, commit = hub._repo(repo_id, revision or "main")
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                siblings = []
                for file in hub._commit_files(repo, commit).values():
                    sibling: dict[str, object] = {"rfilename": file.path}
                    if blobs:
                        sibling.update(size=file.size, blobId=file.oid)
                        if file.lfs:
                            sibling["lfs"] = {
                                "sha256": file.sha256,
                                "size": file.size,
                                "pointerSize": file.pointer_size,
                            }
                    siblings.append(sibling)
                self._json(
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": commit,
                        "private": False,
                        "disabled": False,
                        "gated": "manual" if (repo / "gated").exists() else False,
                        "lastModified": "2026-01-01T00:00:00.000Z",
                        "tags": [],
                        "siblings": siblings,
                    }
                )

            def _tree(self, repo_id: str, revision: str, sub: str, query: dict) -> None:
                repo, commit = hub._repo(repo_id, revision)
                files = hub._commit_files(repo, commit)
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                prefix = f"{sub}/" if sub else ""
                entries, folders = [], set()
                for path, file in files.items():
                    if not path.startswith(prefix):
                        continue
                    parts = path[len(prefix) :].split("/")
                    for depth in range(1, len(parts)):
                        folder = prefix + "/".join(parts[:depth])
                        if folder not in folders and (recursive or depth == 1):
                            folders.add(folder)
                            oid = hashlib.sha1(folder.encode()).hexdigest()
                            entries.append(
                                {"type": "directory", "oid": oid, "size": 0, "path": folder}
                            )
                    if len(parts) > 1 and not recursive:
                        continue
                    entry: dict[str, object] = {
                        "type": "file", "oid": file.oid, "size": file.size, "path": path
                    }  # fmt: skip
                    if file.lfs:
                        entry["lfs"] = {
                            "oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size
                        }  # fmt: skip
                    entries.append(entry)
                start = int(query.get("cursor", ["0"])[0])
                end = start + hub.tree_page_size
                headers = {}
                if end < len(entries):
                    rest = "&".join(f"{k}={v[0]}" for k, v in query.items() if k != "cursor")
                    url = f"{hub.endpoint}{urlsplit(self.path).path}?{rest}&cursor={end}"
                    headers["Link"] = f'<{url}>; rel="next"'
                self._json(entries[start:end], **headers)

            def _resolve(self, path: str, head: bool) -> None:
                repo_id, rest = path.split("/resolve/", 1)
                revision, _, filename = rest.partition("/")
                repo, commit = hub._repo(repo_id, revision)
                if (repo / "gated").exists():
                    raise _HubError(
                        403,
                        "GatedRepo",
                        "Access to model is restricted. You must have access to it and be"
                        " authenticated to access it. Please log in.",
                    )
                file = hub._commit_files(repo, commit).get(filename)
                if file is None:
                    raise _HubError(404, "EntryNotFound", "Entry not found", X_Repo_Commit=commit)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{file.etag}"'}
                if file.lfs:
                    headers |= {
                        "X-Linked-Etag": f'"{file.sha256}"',
                        "X-Linked-Size": str(file.size),
                    }
                if file.lfs and hub.lfs_redirect == "cdn":
                    # Another origin, as the Hub's CDN is: the client does not follow it on HEAD
                    # and reads the X-Linked-* headers of this reply instead.
                    headers["ETag"] = f'"{file.oid}"'
                    self.send_response(302)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    location = f"http://localhost:{hub.port}/cdn/{repo_id}/{commit}/{filename}"
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send(repo_id, file, head, headers)

            def _cdn(self, rest: str, head: bool) -> None:
                match = re.match(r"^(.+)/([0-9a-f]{40})/(.+)$", rest)
                if not match:
                    raise _HubError(404, None, "no such blob")
                repo_id, commit, filename = match.groups()
                repo, commit = hub._repo(repo_id, commit)
                file = hub._commit_files(repo, commit).get(filename)
                if file is None:
                    raise _HubError(404, None, "no such blob")
                self._send(repo_id, file, head, {"ETag": f'"{file.sha256}"'})

            def _send(self, repo_id: str, file: _File, head: bool, headers: dict) -> None:
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(file.size))
                self.end_headers()
                if head:
                    return
                data = file.location.read_bytes()
                if f"{repo_id}/{file.path}" in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                for start in range(0, len(data), CHUNK):
                    self.wfile.write(data[start : start + CHUNK])

        return Handler
