"""`/`: the console page (`cloud_bridge/web/console.html`), open without a token: the page asks for
it and keeps it in the browser's localStorage, then calls `/api` with it. `/docs`: Swagger UI on
`/openapi.json`, its script, style and icon served here from the `fastapi-offline` package (pinned
Swagger UI 5), never from a CDN, so it works offline; its Authorize button takes an API token."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from cloud_bridge.http.deps import ApiError

router = APIRouter()
ASSETS = "/docs/assets"
ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def _web(name: str) -> str:
    return resources.files("cloud_bridge").joinpath(f"web/{name}").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return _web("console.html")


@router.get("/docs", include_in_schema=False)
def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="autoglm-edge cloud bridge: API",
                               swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon.png")


@router.get(ASSETS + "/{name}", include_in_schema=False)
def docs_asset(name: str) -> Response:
    """One of the Swagger UI files `fastapi-offline` ships (only those the page names)."""
    if name not in ASSET_TYPES:
        raise ApiError(404, f"no docs asset {name!r}; the page uses {', '.join(sorted(ASSET_TYPES))}", "not_found")
    data = resources.files("fastapi_offline").joinpath(f"static/{name}").read_bytes()
    return Response(data, media_type=ASSET_TYPES[name], headers={"Cache-Control": "public, max-age=86400"})
