"""A small Hugging Face Hub API server on 127.0.0.1 for offline push / download tests.

It implements the endpoints that the real ``huggingface_hub`` client (2.x, with ``HF_HUB_DISABLE_XET=1``)
and ``transformers.from_pretrained`` call (see ../shared/docs/hf-ecosystem.md §4): repo create / delete,
model info, tree, branches, preupload, the legacy LFS batch + basic PUT transfer, the NDJSON commit,
``HEAD``/``GET .../resolve/...`` with ``X-Repo-Commit`` / ``ETag`` / ``Content-Length``, ``validate-yaml``
and ``whoami-v2``. State lives in memory; a commit is applied all-or-nothing.

Use::

    with FakeHub(token="hf_test") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}
        ...  # run the client (HF_ENDPOINT is read when huggingface_hub is imported)
        hub.files("user/repo")          # {path: bytes} at the head of main
        hub.fail("commit", times=2)     # the next 2 commits answer 500 (transient-error tests)
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx")
"""Files the server asks to upload through LFS (as the real Hub's default .gitattributes does)."""

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class Commit:
    """One commit: its files (path -> bytes), parent and message."""

    sha: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    """A model repository: commits by sha and branch heads."""

    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return self.commits.get(sha)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server: start with ``start()`` (or ``with FakeHub() as hub``), stop with ``stop()``.

    Args:
        token: if set, every write (and every read of a private repo) needs ``Authorization: Bearer <token>``.
        user: the name ``whoami-v2`` answers.
    """

    def __init__(self, token: str | None = None, user: str = "tester") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unauthorized: list[tuple[str, str]] = []
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- test-facing helpers -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:  # noqa: PYI034 - FakeHub is not subclassed
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(self, endpoint: str, times: int = 1, status: int = 500) -> None:
        """Make the next ``times`` calls of ``endpoint`` (``"commit"``, ``"preupload"``, ``"create"``,
        ``"lfs-batch"``) answer ``status`` before doing anything."""
        with self._lock:
            self._failures.setdefault(endpoint, []).extend([status] * times)

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        """The commit sha of ``branch`` (None if the repo or branch does not exist)."""
        repo = self.repos.get(repo_id)
        return None if repo is None else repo.refs.get(branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files at ``revision`` of ``repo_id`` (KeyError if there is no such repo or revision)."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return dict(commit.files)

    # ---- state changes (called with the lock held) ---------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> Commit:
        h = hashlib.sha1((parent or "").encode() + message.encode())
        for p in sorted(files):
            h.update(p.encode() + b"\0" + _git_blob_sha(files[p]).encode())
        commit = Commit(h.hexdigest(), files, parent, message)
        repo.commits[commit.sha] = commit
        return commit

    def _take_failure(self, endpoint: str) -> int | None:
        with self._lock:
            queue = self._failures.get(endpoint)
            return queue.pop(0) if queue else None


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        # ---- plumbing -------------------------------------------------------------------------------------
        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer carries no body, whatever the status
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _authorized(self) -> bool:
            if hub.token is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _need_auth(self) -> bool:
            if self._authorized():
                return False
            hub.unauthorized.append((self.command, self.path))
            self._error(401, None, "Invalid credentials in Authorization header")
            return True

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            if write and self._need_auth():
                return None
            return repo

        def _commit_of(self, repo: Repo, rev: str) -> Commit | None:
            commit = repo.resolve(unquote(rev))
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
            return commit

        def _injected(self, endpoint: str) -> bool:
            status = hub._take_failure(endpoint)
            if status is None:
                return False
            self._error(status, None, f"injected failure of {endpoint}")
            return True

        # ---- dispatch -------------------------------------------------------------------------------------
        def _dispatch(self) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path))
            # Read the whole body first: an answer that leaves it unread would corrupt the keep-alive stream.
            self.body = self._read_body()
            for method, pattern, fn in ROUTES:
                if method == self.command or (method == "GET" and self.command == "HEAD"):
                    m = re.fullmatch(pattern, path)
                    if m:
                        return fn(self, **{k: unquote(v) for k, v in m.groupdict().items() if v is not None})
            self._error(404, None, f"fake hub: no route for {self.command} {path}")

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # ---- endpoints ------------------------------------------------------------------------------------
        def create_repo(self) -> None:
            if self._need_auth() or self._injected("create"):
                return
            payload = json.loads(self.body or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if payload.get("type", "model") != "model":
                return self._error(400, None, "fake hub: only model repos")
            with hub._lock:
                if repo_id in hub.repos:
                    msg = "You already created this model repo"  # the real Hub's 409 also carries the url
                    return self._json(409, {"error": msg, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": msg})
                repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
                first = hub._new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                        "initial commit")
                repo.refs["main"] = first.sha
                hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def delete_repo(self) -> None:
            if self._need_auth():
                return
            payload = json.loads(self.body or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            with hub._lock:
                if hub.repos.pop(repo_id, None) is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            self._json(200, {})

        def model_info(self, repo: str, rev: str = "main") -> None:
            r = self._repo(repo)
            if r is None:
                return
            commit = self._commit_of(r, rev)
            if commit is None:
                return
            self._json(200, {
                "id": repo, "_id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.sha,
                "private": r.private, "disabled": False, "gated": False, "tags": [],
                "lastModified": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            })

        def tree(self, repo: str, rev: str, sub: str = "") -> None:
            r = self._repo(repo)
            if r is None:
                return
            commit = self._commit_of(r, rev)
            if commit is None:
                return
            prefix = sub.strip("/") + "/" if sub.strip("/") else ""
            entries, dirs = [], set()
            for p, data in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if "/" in rest and not self._recursive():
                    dirs.add(prefix + rest.split("/")[0])
                    continue
                entry: dict[str, Any] = {"type": "file", "path": p, "size": len(data), "oid": _git_blob_sha(data)}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
            self._json(200, entries)

        def _recursive(self) -> bool:
            return "recursive=true" in (urlsplit(self.path).query or "").lower()

        def create_branch(self, repo: str, rev: str) -> None:
            r = self._repo(repo, write=True)
            if r is None:
                return
            payload = json.loads(self.body or b"{}")
            with hub._lock:
                if rev in r.refs:
                    return self._error(409, None, f"Branch {rev} already exists")
                start = r.resolve(payload.get("startingPoint") or "main")
                if start is None:
                    return self._error(404, "RevisionNotFound", "Invalid starting point")
                r.refs[rev] = start.sha
            self._json(200, {})

        def delete_branch(self, repo: str, rev: str) -> None:
            r = self._repo(repo, write=True)
            if r is None:
                return
            with hub._lock:
                if rev == "main" or r.refs.pop(rev, None) is None:
                    return self._error(404 if rev != "main" else 403, "RevisionNotFound", f"cannot delete branch {rev}")
            self._json(200, {})

        def preupload(self, repo: str, rev: str) -> None:
            r = self._repo(repo, write=True)
            if r is None or self._injected("preupload"):
                return
            payload = json.loads(self.body)
            files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                      "shouldIgnore": False, "oid": None} for f in payload["files"]]
            self._json(200, {"files": files, "commitOid": r.refs.get(rev)})

        def lfs_batch(self, repo: str) -> None:
            r = self._repo(repo, write=True)
            if r is None or self._injected("lfs-batch"):
                return
            payload = json.loads(self.body)
            objects = []
            for obj in payload["objects"]:
                item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:  # already stored objects need no upload (deduplication)
                    item["actions"] = {"upload": {"href": f"{hub.url}/lfs-objects/{obj['oid']}"}}
                objects.append(item)
            self._json(200, {"transfer": "basic", "objects": objects})

        def lfs_put(self, oid: str) -> None:
            data = self.body
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 mismatch")
            with hub._lock:
                hub.lfs[oid] = data
            self._json(200, {})

        def commit(self, repo: str, rev: str) -> None:
            r = self._repo(repo, write=True)
            if r is None or self._injected("commit"):
                return
            lines = [json.loads(ln) for ln in self.body.splitlines() if ln.strip()]
            header = next((ln["value"] for ln in lines if ln["key"] == "header"), None)
            if header is None:
                return self._error(400, None, "commit without header")
            with hub._lock:
                head = r.refs.get(rev)
                if head is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                    return self._error(412, None, "A commit has happened since; parentCommit is outdated")
                files = dict(r.commits[head].files)
                for ln in lines:
                    key, value = ln["key"], ln["value"]
                    if key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            return self._error(422, None, f"LFS object {value['oid']} was not uploaded")
                        files[value["path"]] = hub.lfs[value["oid"]]
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                    elif key != "header":
                        return self._error(400, None, f"unknown commit operation {key}")
                new = hub._new_commit(r, head, files, header.get("summary", ""))
                r.refs[rev] = new.sha
            self._json(200, {"commitOid": new.sha, "commitUrl": f"{hub.url}/{repo}/commit/{new.sha}",
                             "pullRequestUrl": None, "success": True})

        def resolve(self, repo: str, rev: str, file: str) -> None:
            r = self._repo(repo)
            if r is None:
                return
            commit = self._commit_of(r, rev)
            if commit is None:
                return
            data = commit.files.get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}")
            lfs = file.endswith(LFS_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha(data)
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if rng and self.command == "GET":
                start = int(rng.group(1))
                end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], headers, "application/octet-stream")
            self._send(200, data, headers, "application/octet-stream")

        def validate_yaml(self) -> None:
            """Parse the card's YAML header as the Hub does; answer JSON even without errors (the client reads it)."""
            content = json.loads(self.body)["content"]
            m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
            if m and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
            self._json(200, {"errors": [], "warnings": warnings})

        def whoami(self) -> None:
            if self._need_auth():
                return
            self._json(200, {"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    ROUTES = [
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("DELETE", r"/api/repos/delete", Handler.delete_repo),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("GET", r"/api/whoami-v2", Handler.whoami),
        ("GET", rf"/api/models/{_REPO}", Handler.model_info),
        ("GET", rf"/api/models/{_REPO}/revision/{_REV}", Handler.model_info),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.*))?", Handler.tree),
        ("POST", rf"/api/models/{_REPO}/branch/{_REV}", Handler.create_branch),
        ("DELETE", rf"/api/models/{_REPO}/branch/{_REV}", Handler.delete_branch),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", Handler.preupload),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", Handler.commit),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
        ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<file>.+)", Handler.resolve),
    ]
    return Handler
