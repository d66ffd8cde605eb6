"""The web UI's files as the server ships them: routes, headers, package data, and the
rules the page's code keeps (no network but this server, model text never parsed as HTML).
The page's behaviour in a browser: ``test_webui_browser.py``."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from ferry.config import ServerConfig
from ferry.server.cli_flags import build_config
from ferry.server.webui import CONTENT_SECURITY_POLICY, load_files

WEBUI_DIR = Path(__file__).resolve().parents[2] / "ferry" / "server" / "webui"
REPO_ROOT = WEBUI_DIR.parents[2]


def test_index_and_assets_are_served_with_a_strict_csp(server):
    page = httpx.get(f"{server.url}/", timeout=10)   # the page itself needs no API key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert '<script type="module" src="/ui/app.js">' in page.text
    for name in re.findall(r'(?:src|href)="/ui/([\w.]+)"', page.text):
        asset = httpx.get(f"{server.url}/ui/{name}", timeout=10)
        assert asset.status_code == 200, name
        assert asset.headers["x-content-type-options"] == "nosniff"
    js = httpx.get(f"{server.url}/ui/app.js", timeout=10)
    assert js.headers["content-type"].startswith("text/javascript")


@pytest.mark.parametrize("name", ["missing.js", "..%2Fwebui.py", "%2E%2E%2Fapi_server.py"])
def test_only_the_ui_files_are_served(server, name):
    resp = httpx.get(f"{server.url}/ui/{name}", timeout=10)
    assert resp.status_code == 404
    assert "error" in resp.json()


def test_no_web_ui_leaves_the_routes_out():
    from ferry.llm import build_engine
    from ferry.config import EngineConfig
    from ferry.server.api_server import build_app

    engine = build_engine(EngineConfig.from_sources())   # the demo model
    client = TestClient(build_app(engine, ServerConfig(web_ui=False)))
    assert client.get("/").status_code == 404
    assert client.get("/ui/app.js").status_code == 404
    assert TestClient(build_app(engine, ServerConfig())).get("/").status_code == 200


def test_the_flag_turns_it_off():
    assert build_config(None, {}).server.web_ui is True
    assert build_config(None, {"web_ui": False}).server.web_ui is False


def test_every_ui_file_is_package_data():
    """A wheel ships what pyproject's package-data names: every file of the UI must match."""
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["ferry.server"]
    for path in WEBUI_DIR.iterdir():
        assert any(path.match(p.split("/")[-1]) for p in patterns), path.name
    assert set(load_files()) == {p.name for p in WEBUI_DIR.iterdir()}


def test_the_page_fetches_nothing_from_the_network():
    for path in WEBUI_DIR.iterdir():
        text = path.read_text()
        # The only absolute URLs allowed are the ones a link's scheme is checked against.
        urls = [u for u in re.findall(r"https?://[^\s\"'`)]+", text)]
        assert not urls, (path.name, urls)
        assert "@import" not in text and "//cdn" not in text


def test_model_text_never_becomes_html():
    """No HTML parsing sinks in the page's code: text goes in with textContent."""
    for path in WEBUI_DIR.glob("*.js"):
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function"):
            assert sink not in code, (path.name, sink)
