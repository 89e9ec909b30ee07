"""The body guard: an ASGI middleware in front of `/api` and `/v1` that checks the bearer token
before a single body byte is read, and refuses bodies larger than `[http] max_body_bytes`.

FastAPI reads and parses a request body before it runs the route's dependencies, so without this
guard an unauthenticated client could make the bridge buffer any amount of memory. The guard:

- answers 401 (the check and message of `deps.authenticate`, which also records the caller)
  without reading the body;
- answers 413 at once when `Content-Length` is above the limit;
- counts the bytes of a body sent without `Content-Length` (chunked) as the app reads them and
  answers 413 as soon as the count passes the limit; the rest is never read into memory
  (uvicorn discards what arrives after the response).
"""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_bridge.http.deps import BEARER, ApiError, api_error_response, authenticate

GUARDED_PREFIXES = ("/api/", "/v1/")


class BodyTooLarge(Exception):
    """Raised into the app when the body it reads passes the limit (413 already sent)."""


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes ([http] max_body_bytes); send a smaller body",
                    "body_too_large", retry=False)


class BodyGuard:
    """ASGI middleware: token first, then a bounded body, for every path under GUARDED_PREFIXES."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            authenticate(request, await BEARER(request))
            length = Headers(scope=scope).get("content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                raise too_large(self.limit)
        except ApiError as refusal:
            await api_error_response(request, refusal)(scope, receive, send)
            return
        await self._bounded(scope, receive, send)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, refused = 0, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not refused:
                    refused = True
                    await api_error_response(Request(scope), too_large(self.limit))(scope, receive, send)
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the app's own answer to the aborted read is dropped: the 413 went out
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass
