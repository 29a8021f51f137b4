"""What every request to `uniultra serve` passes before it reaches an endpoint (one ASGI middleware).

In order: the Host header must be an allowed name (a page on another site cannot reach a local
server through DNS rebinding); the access token, when the server has one; the body size (an
upload may be large, any other body is a small JSON document); then the request's session is
set, so that each client has its own image cache (see `sessions`).

Answers are JSON `{"detail": ...}` like the API's own errors.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from fastapi import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse

from uniultra.serve.sessions import SESSION_COOKIE, current_session

DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "uniultra_token"
MAX_JSON_BYTES = 64 * 1024  # a prompt with the most points allowed is a few KB
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class Guard:
    """Host allow-list, optional token, body-size limits and session, for every request.

    `allowed_hosts`: names the Host header may carry (port ignored); "*" allows any.
    `token`: when set, a request needs `Authorization: Bearer TOKEN` or the cookie the page gets
    from opening `/?token=TOKEN` once. `upload_path`/`upload_limit`: the endpoint that takes
    files (and, with `file_suffix`, any POST under it ending so: the DICOM SEG export takes a label
    map file); every other body is limited to `MAX_JSON_BYTES`.
    """

    def __init__(self, app, *, allowed_hosts: Iterable[str], token: str | None, upload_path: str,
                 upload_limit: int, upload_limit_text: str, file_suffix: str | None = None) -> None:
        self.app = app
        self.hosts = {_bare_host(h) for h in allowed_hosts}
        self.token = token.encode() if token else None
        self.upload_path, self.upload_limit, self.upload_limit_text = upload_path, upload_limit, upload_limit_text
        self.file_suffix = file_suffix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websocket route
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        session, new_session = _session(scope, headers)
        token = current_session.set(session)
        try:
            send = _with_cookie(send, SESSION_COOKIE, session) if new_session else send
            await self._limited(scope, receive, send)
        finally:
            current_session.reset(token)

    def _refusal(self, scope, headers: dict[str, str]):
        """The response that refuses the request, or None to let it through."""
        host = _bare_host(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return _error(400, f"host {host!r} is not allowed (this server answers to {allowed}); start "
                               f"`uniultra serve` with --allow-host {host or 'NAME'} to reach it by that name")
        if self.token is None:
            return None
        if self._token_in_query(scope):
            # The page's login link: keep the token in an HttpOnly cookie and drop it from the address bar.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict")
            return response
        if not self._has_token(headers):
            return _error(401, "missing or wrong access token: open the address `uniultra serve` printed "
                               "(it ends in ?token=...), or send the header Authorization: Bearer TOKEN",
                          {"WWW-Authenticate": "Bearer"})
        return None

    def _token_in_query(self, scope) -> bool:
        if scope["method"] != "GET" or scope["path"] != "/":
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return secrets.compare_digest(given.encode(), self.token)

    def _has_token(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = _cookies(headers).get(TOKEN_COOKIE, "")
        return secrets.compare_digest(given.strip().encode(), self.token)

    async def _limited(self, scope, receive, send) -> None:
        """Refuse a body over the limit with 413 before any parsing: a declared Content-Length is
        answered at once, a chunked body is counted as it arrives (buffered up to the limit, then
        replayed to the app)."""
        path = scope["path"].rstrip("/")
        upload = scope["method"] == "POST" and (path == self.upload_path or bool(
            self.file_suffix and path.startswith(self.upload_path + "/") and path.endswith(self.file_suffix)))
        limit = self.upload_limit if upload else MAX_JSON_BYTES
        declared = _headers(scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, int(declared), upload)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                await self._too_large(scope, receive, send, size, upload)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: int, upload: bool) -> None:
        if upload:
            message = f"upload of {size} bytes or more exceeds the limit of {self.upload_limit_text}"
        else:
            message = (f"request body of {size} bytes or more exceeds the limit of {MAX_JSON_BYTES // 1024} KB "
                       f"for {scope['method']} {scope['path']} (only POST {self.upload_path} takes files)")
        await _error(413, message, {"Connection": "close"})(scope, receive, send)


class DecodeSlots:
    """At most `n` uploads decoded and encoded at once: a 40-megapixel decode takes hundreds of MB,
    so a burst of uploads must queue, not run side by side. A request waits up to `wait_s` for a
    slot, then gets 503 with a Retry-After."""

    def __init__(self, n: int, wait_s: float) -> None:
        if n < 1:
            raise ValueError(f"concurrent decodes must be at least 1, got {n}")
        self.n, self.wait_s = n, wait_s
        self._slots = threading.BoundedSemaphore(n)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise HTTPException(503, f"the server is busy: {self.n} other upload(s) are being decoded; "
                                     "try again in a few seconds", headers={"Retry-After": "2"})
        try:
            yield
        finally:
            self._slots.release()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed Cookie header is just no cookie
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _bare_host(host: str) -> str:
    """`Example.org:8000` -> `example.org`, `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _session(scope, headers: dict[str, str]) -> tuple[str, bool]:
    """(session id, whether to set its cookie). A browser gets a random session in a cookie with
    the page (`/` only, which API clients do not load: a client that got its session from its
    address stays in it); a client without that cookie (curl, scripts) is one session per
    address, so that it needs no cookie handling to use the ids it uploaded."""
    given = _cookies(headers).get(SESSION_COOKIE, "")
    if _SESSION_ID.match(given):
        return given, False
    if scope["method"] == "GET" and scope["path"] in ("/", "/index.html"):
        return secrets.token_urlsafe(18), True
    client = scope.get("client") or ("unknown", 0)
    return f"address:{client[0]}", False


def _with_cookie(send, name: str, value: str):
    cookie = f"{name}={value}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")

    async def send_with_cookie(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return send_with_cookie
