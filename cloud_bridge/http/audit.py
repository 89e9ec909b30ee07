"""The audit log of the HTTP API: every call that may change something (any method but GET, HEAD and
OPTIONS) is recorded once answered, with the caller, the method and path, what it acted on and the
outcome, whether it was allowed or not. Reads are not recorded."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from cloud_bridge.http.deps import Caller, registry_of
from cloud_bridge.store.access import ANONYMOUS

log = logging.getLogger(__name__)
READS = frozenset({"GET", "HEAD", "OPTIONS"})


def outcome(status: int) -> str:
    """`ok` for a success, else `http <status>`."""
    return "ok" if status < 400 else f"http {status}"


async def audit_middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Answer the request, then record it in the registry's audit log unless it is a read."""
    if request.method in READS:
        return await call_next(request)
    try:
        response = await call_next(request)
    except Exception:
        await _record(request, 500)
        raise
    await _record(request, response.status_code)
    return response


async def _record(request: Request, status: int) -> None:
    caller: Caller | None = getattr(request.state, "caller", None)
    target = getattr(request.state, "audit_target", None) or request.url.path
    try:
        await run_in_threadpool(registry_of(request).audit.record, caller.name if caller else ANONYMOUS,
                                f"{request.method} {request.url.path}", target, outcome(status))
    except Exception:  # the answer is already decided; a registry that cannot write is logged, not fatal
        log.exception("could not write the audit log entry of %s %s", request.method, request.url.path)
