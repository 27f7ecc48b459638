"""Which browser owns each file the app serves, and the gate in front of Gradio that enforces it.

Gradio serves any file under its upload folder to whoever names its path (`/gradio_api/file=<path>`), and
accepts such a path as any session's input. The paths are unguessable hashes, but a path leaks (logs, shared
screenshots, the page's network traffic): so each browser gets an owner cookie (HttpOnly, minted on its first
request, kept by browsers and by gradio_client alike), every upload is claimed for the cookie that sent it,
the app claims the wavs it writes for a session, and a claimed file is served to, and taken as input from, its
owner only. Unclaimed files (the example clips, Gradio's own assets) are served as Gradio serves them.

The app writes its wavs inside Gradio's upload folder, which Gradio serves without copying, so that deleting a
file deletes the only copy there is.
"""
from __future__ import annotations

import json
import secrets
import threading
from contextlib import suppress
from pathlib import Path

from starlette.requests import cookie_parser
from starlette.responses import JSONResponse

OWNER_COOKIE = "blsp_chat_owner"
FILE_ROUTE = "/gradio_api/file="
UPLOAD_ROUTE = "/gradio_api/upload"


def _key(path) -> Path:
    return Path(path).resolve()


class FileOwners:
    """path -> the owner cookies it belongs to. Gradio stores an upload under a hash of its bytes, so two browsers
    that upload the same clip hold the same path: each is an owner, and the file goes when the last lets it go.
    `roots`: folders that hold files and are never removed (a file's own folder, e.g. the hash folder an upload
    came in, goes with its file once empty)."""

    def __init__(self, roots: tuple[Path, ...] = ()):
        self._owners: dict[Path, set[str]] = {}
        self._lock = threading.Lock()
        self.roots = {_key(root) for root in roots}

    def claim(self, path, owner: str | None) -> None:
        """`path` belongs to `owner` too (None: nobody; an unclaimed file is left as Gradio serves it)."""
        if owner is not None:
            with self._lock:
                self._owners.setdefault(_key(path), set()).add(owner)

    def owns(self, path, owner: str | None) -> bool:
        with self._lock:
            return owner is not None and owner in self._owners.get(_key(path), ())

    def may_use(self, path, owner: str | None) -> bool:
        """Whether `owner` may fetch `path` or name it as input: its own files and unclaimed ones."""
        with self._lock:
            owners = self._owners.get(_key(path))
        return owners is None or owner in owners

    def release(self, path, owner: str | None) -> None:
        """`owner` lets `path` go; deleted (with its own folder, once empty) when no owner is left."""
        key = _key(path)
        with self._lock:
            owners = self._owners.get(key, set())
            owners.discard(owner)
            if owners:
                return
            self._owners.pop(key, None)
        key.unlink(missing_ok=True)
        if key.parent not in self.roots:
            with suppress(OSError):  # not empty, or already gone
                key.parent.rmdir()


def owner_from_cookies(cookies: dict[str, str] | None) -> str | None:
    return (cookies or {}).get(OWNER_COOKIE) or None


class OwnerGate:
    """ASGI middleware in front of the Gradio app: mints the owner cookie, refuses another owner's files on the
    file route (404, as for a file that does not exist), and claims what an upload stored for its sender."""

    def __init__(self, app, owners: FileOwners):
        self.app, self.owners = app, owners

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope, send, owner = self._with_owner(scope, send)
        path = scope.get("path", "")
        if path.startswith(FILE_ROUTE) and not self.owners.may_use(path[len(FILE_ROUTE):], owner):
            response = JSONResponse({"detail": "Not Found"}, status_code=404)
            return await response(scope, receive, send)
        if path == UPLOAD_ROUTE and scope.get("method") == "POST":
            send = self._claiming_uploads(send, owner)
        return await self.app(scope, receive, send)

    @staticmethod
    def _with_owner(scope, send):
        """The request's owner; a request without the cookie gets a new one, in its response and in its own
        headers (so that the app sees the same owner in this very request)."""
        headers = list(scope.get("headers") or [])
        cookies = cookie_parser(b"; ".join(v for k, v in headers if k == b"cookie").decode("latin-1"))
        owner = owner_from_cookies(cookies)
        if owner is not None:
            return scope, send, owner
        owner = secrets.token_urlsafe(24)
        cookie = f"{OWNER_COOKIE}={owner}"
        scope = {**scope, "headers": [*headers, (b"cookie", cookie.encode())]}

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                set_cookie = f"{cookie}; Path=/; HttpOnly; SameSite=Lax".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        return scope, send_with_cookie, owner

    def _claiming_uploads(self, send, owner: str):
        """`send`, reading the upload route's answer (a JSON list of the stored paths) on its way out."""
        status, body = [0], bytearray()

        async def claiming(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body") and status[0] == 200:
                    self._claim_listed(bytes(body), owner)
            await send(message)

        return claiming

    def _claim_listed(self, body: bytes, owner: str) -> None:
        with suppress(ValueError):
            for path in json.loads(body):
                if isinstance(path, str):
                    self.owners.claim(path, owner)
