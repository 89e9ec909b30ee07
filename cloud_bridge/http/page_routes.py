"""`/`: the console page (`cloud_bridge/web/console.html`), open without a token: the page asks for
it and keeps it in the browser's localStorage, then calls `/api` with it. `/docs`: the API's
operations listed from `/openapi.json` by a page served here (`web/docs.html`; no CDN, so it works
offline)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


def _web(name: str) -> str:
    return resources.files("cloud_bridge").joinpath(f"web/{name}").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return _web("console.html")


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def docs() -> str:
    return _web("docs.html")
