"""`/`: the console page (`cloud_bridge/web/console.html`), open without a token: the page asks for
it and keeps it in the browser's localStorage, then calls `/api` with it."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return resources.files("cloud_bridge").joinpath("web/console.html").read_text(encoding="utf-8")
