"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's real client over HTTP.

Standard library only. It serves the calls that `HfApi.create_repo` / `upload_folder` / `create_commit`,
`hf_hub_download` and `transformers`' `from_pretrained` / `push_to_hub` make:

- `GET  /api/whoami-v2`, `POST /api/repos/create`, `POST /api/validate-yaml`
- `POST /api/models/{repo}/preupload/{rev}` — every file is answered `uploadMode: "regular"`, so the client
  sends it inline (base64) in the commit and no LFS / Xet storage is needed
- `POST /api/models/{repo}/commit/{rev}` — ndjson: header, file, deletedFile, deletedFolder
- `POST /api/models/{repo}/branch/{branch}`
- `GET  /api/models/{repo}[/revision/{rev}]` (siblings), `GET /api/models/{repo}/tree/{rev}[/{path}]`
- `HEAD|GET /{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`, `Content-Length` (and `Range` on GET)

Each commit is a full snapshot on disk: `root/{namespace}/{name}/{commit sha}/...`; branches live in
`root/{namespace}/{name}/refs.json`. A revision is a branch name or a (full or 7+ character) commit sha.
The server binds to 127.0.0.1 only and every connection has a socket timeout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


USER = "tester"
REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"^/api/whoami(-v2)?$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubStore:
    """Repositories on disk: one snapshot folder per commit, branches in refs.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- repositories and revisions ------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        if repo_id.count("/") != 1 or ".." in repo_id:
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        return self.root / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self.repo_dir(repo_id) / "refs.json").is_file()

    def refs(self, repo_id: str) -> dict:
        if not self.exists(repo_id):
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads((self.repo_dir(repo_id) / "refs.json").read_text())

    def meta(self, repo_id: str) -> dict:
        return json.loads((self.repo_dir(repo_id) / "meta.json").read_text())

    def create(self, repo_id: str, private: bool = False) -> None:
        with self.lock:
            if self.exists(repo_id):
                raise HubError(409, "You already created this model repo")
            folder = self.repo_dir(repo_id)
            sha = self._new_sha(repo_id, None, "initial commit")
            (folder / "commits" / sha).mkdir(parents=True)
            (folder / "meta.json").write_text(json.dumps({"private": private, "created": time.time()}))
            self._write_log(repo_id, sha, None, "initial commit")
            (folder / "refs.json").write_text(json.dumps({"main": sha}))

    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit sha a branch name or a (possibly abbreviated) sha points to."""
        refs = self.refs(repo_id)
        if revision in refs:
            return refs[revision]
        commits = self.repo_dir(repo_id) / "commits"
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [p.name for p in commits.iterdir() if p.name.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def snapshot(self, repo_id: str, sha: str) -> Path:
        return self.repo_dir(repo_id) / "commits" / sha

    def files(self, repo_id: str, sha: str) -> dict[str, Path]:
        base = self.snapshot(repo_id, sha)
        return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}

    def file(self, repo_id: str, revision: str, path: str) -> tuple[str, Path]:
        sha = self.resolve(repo_id, revision)
        target = self.snapshot(repo_id, sha) / path
        if ".." in Path(path).parts or not target.is_file():
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        return sha, target

    # -- writing -------------------------------------------------------------------------------------------------
    def commit(self, repo_id: str, branch: str, operations: list[dict], message: str, parent: str | None) -> str:
        with self.lock:
            refs = self.refs(repo_id)
            if branch not in refs:
                raise HubError(404, f"Branch {branch} not found (commits go to a branch)", "RevisionNotFound")
            head = refs[branch]
            if parent is not None and not head.startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {branch} ({head})")
            sha = self._new_sha(repo_id, head, message)
            new = self.snapshot(repo_id, sha)
            shutil.copytree(self.snapshot(repo_id, head), new)
            try:
                for op in operations:
                    path = op["path"].lstrip("/")
                    if ".." in Path(path).parts:
                        raise HubError(400, f"Invalid path {path!r}")
                    if op["kind"] == "file":
                        (new / path).parent.mkdir(parents=True, exist_ok=True)
                        (new / path).write_bytes(op["content"])
                    elif op["kind"] == "deletedFile":
                        if not (new / path).is_file():
                            raise HubError(404, f"Cannot delete {path}: not found", "EntryNotFound")
                        (new / path).unlink()
                    elif op["kind"] == "deletedFolder":
                        shutil.rmtree(new / path, ignore_errors=True)
            except BaseException:
                shutil.rmtree(new, ignore_errors=True)
                raise
            self._write_log(repo_id, sha, head, message)
            refs[branch] = sha
            (self.repo_dir(repo_id) / "refs.json").write_text(json.dumps(refs))
            return sha

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            refs = self.refs(repo_id)
            if branch in refs:
                raise HubError(409, f"Branch {branch} already exists")
            refs[branch] = self.resolve(repo_id, starting_point or "main")
            (self.repo_dir(repo_id) / "refs.json").write_text(json.dumps(refs))

    def _new_sha(self, repo_id: str, parent: str | None, message: str) -> str:
        return hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{time.time_ns()}".encode()).hexdigest()

    def _write_log(self, repo_id: str, sha: str, parent: str | None, message: str) -> None:
        log = self.repo_dir(repo_id) / "log.jsonl"
        with log.open("a") as f:
            f.write(json.dumps({"sha": sha, "parent": parent, "message": message, "time": time.time()}) + "\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "LocalHub/1.0"
    timeout = 30  # socket timeout: a stalled client can never hold a server thread forever

    # -- plumbing ------------------------------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.server.requests.append((method, url.path))
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if match and route_method == method:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, "do_" + name)(**params)
            raise HubError(404, f"No route for {method} {url.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, status=e.status, headers=headers)

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.server.max_body:
            raise HubError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Authorization header is required for this call")

    def _readable(self, repo_id: str) -> None:
        store = self.server.store
        if not store.exists(repo_id):
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        if store.meta(repo_id)["private"]:
            self._require_token()

    @property
    def store(self) -> HubStore:
        return self.server.store

    # -- API -----------------------------------------------------------------------------------------------------
    def do_whoami(self) -> None:
        self._require_token()
        self._json({"type": "user", "name": USER, "fullname": "Local Tester", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write"}}})

    def do_create_repo(self) -> None:
        self._require_token()
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This local hub serves model repositories only")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        try:
            self.store.create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        except HubError as e:
            if e.status == 409:
                return self._json({"error": e.message, "url": url}, status=409)
            raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def do_validate_yaml(self) -> None:
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": str(e)}], "warnings": []}, status=400)
        if metadata is not None and not isinstance(metadata, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, status=400)
        self._json({"errors": [], "warnings": []})

    def do_preupload(self, repo: str, rev: str) -> None:
        self._require_token()
        files = json.loads(self._body())["files"]
        sha = self.store.resolve(repo, rev)
        existing = self.store.files(repo, sha)
        answer = []
        for entry in files:
            path = entry["path"]
            oid = git_blob_sha1(existing[path].read_bytes()) if path in existing else None
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": answer, "commitOid": sha})

    def do_commit(self, repo: str, rev: str) -> None:
        self._require_token()
        header, operations = {}, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value["content"])
                operations.append({"kind": "file", "path": value["path"], "content": content})
            elif key in ("deletedFile", "deletedFolder"):
                operations.append({"kind": key, "path": value["path"]})
            else:
                raise HubError(422, f"Operation {key!r} is not supported by the local hub (no LFS/Xet storage)")
        sha = self.store.commit(repo, rev, operations, header.get("summary", ""), header.get("parentCommit"))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo}/commit/{sha}",
                    "hookOutput": ""})

    def do_create_branch(self, repo: str, rev: str) -> None:
        self._require_token()
        payload = json.loads(self._body() or b"{}")
        self.store.create_branch(repo, rev, payload.get("startingPoint"))
        self._json({})

    def do_model_info(self, repo: str, rev: str = "main") -> None:
        self._readable(repo)
        sha = self.store.resolve(repo, rev)
        files = self.store.files(repo, sha)
        meta = self.store.meta(repo)
        self._json({
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha, "private": meta["private"],
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "siblings": [{"rfilename": name} for name in files],
        })

    def do_tree(self, repo: str, rev: str, path: str = "") -> None:
        self._readable(repo)
        sha = self.store.resolve(repo, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name, file in self.store.files(repo, sha).items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            data = file.read_bytes()
            entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                    for f in sorted(folders)]
        self._json(entries)

    def do_resolve(self, repo: str, rev: str, path: str) -> None:
        self._readable(repo)
        sha, file = self.store.file(repo, rev, path)
        data = file.read_bytes()
        status, start = 200, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if self.command == "GET" else None
        if match and int(match.group(1)) < len(data):
            status, start = 206, int(match.group(1))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{git_blob_sha1(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:])


class LocalHub:
    """`with LocalHub(root) as hub:` serves `root` at `hub.url` (127.0.0.1, a free port) from a daemon thread."""

    def __init__(self, root: str | Path, max_body: int = 512 * 1024 * 1024):
        self.store = HubStore(root)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.store = self.store
        self.httpd.requests = []
        self.httpd.max_body = max_body
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.httpd.requests

    def start(self) -> LocalHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo_files(self, repo_id: str, revision: str = "main") -> set[str]:
        return set(self.store.files(repo_id, self.store.resolve(repo_id, revision)))


if __name__ == "__main__":  # serve a folder by hand: python tests/hub_server.py /tmp/hub
    import sys

    with LocalHub(sys.argv[1] if len(sys.argv) > 1 else "local-hub") as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass
