"""`/docs` rendered by a real headless Chromium from a real HTTP server: Swagger UI lists every operation
of `/openapi.json`, and every request the page makes goes to the bridge itself (no CDN)."""

from __future__ import annotations

import json

import httpx

from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app

from .conftest import http_server

TOKEN = "docs-token-0123456789abcdef"


def requested_urls(browser) -> list[str]:
    """Every URL the page requested, from Chromium's network log."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_docs_render_every_operation_with_nothing_loaded_from_elsewhere(registry, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with http_server(create_app(registry, BridgeConfig(), TOKEN)) as url:
        spec = httpx.get(url + "/openapi.json").json()
        operations = sum(len(methods) for methods in spec["paths"].values())
        browser.get_log("performance")  # drop what earlier pages requested
        browser.get(url + "/docs")
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) == operations)
        assert browser.find_elements(By.CSS_SELECTOR, ".btn.authorize"), "the Authorize button takes a token"
        urls = requested_urls(browser)
    assert url + "/docs/assets/swagger-ui-bundle.js" in urls and url + "/openapi.json" in urls
    elsewhere = [u for u in urls if not u.startswith(url + "/") and not u.startswith("data:")]
    assert not elsewhere, f"/docs loaded from elsewhere: {elsewhere}"
