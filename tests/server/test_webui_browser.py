"""The web UI in a real browser: headless Chromium (the Debian package, never a download)
driven by Playwright against a real ``ferry serve``.

The demo model answers its tasks exactly ("Reverse: hello" -> "olleh"), so the page's
answer can be checked; the tiny random Llama of the shared ``server`` fixture (API key on,
2,048-token context) gives a long stream to stop. Skipped with the reason when Chromium or
Playwright is missing: ``apt-get install chromium`` and ``pip install playwright``.
Set ``FERRY_SCREENSHOTS_DIR`` to save the screenshots the README shows.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from ferry_server_process import API_KEY, metric, scrape, start_server

CHROMIUM = next((p for p in (os.environ.get("FERRY_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium)"),
    pytest.mark.timeout(300),
]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright is not installed (pip install playwright)")
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_server():
    proc = start_server(["--kv-cache-memory", "64MiB"])   # the bundled demo model
    yield proc
    proc.stop()


@pytest.fixture
def page(browser):
    """A fresh page (empty storage) that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("FERRY_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def _wait(page, expression: str, timeout_ms: int = WAIT_MS) -> None:
    """Poll ``expression`` until true. (``page.wait_for_function`` evaluates its predicate
    with eval inside the page, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def _ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def _wait_idle(page) -> None:
    _wait(page, "document.querySelector('#stop').hidden")


def _answers(page) -> list[str]:
    return [t.strip() for t in page.locator(".message.assistant .content").all_inner_texts()]


def test_a_message_streams_in_and_the_answer_is_right(page, demo_server):
    page.goto(demo_server.url)
    _wait(page, "document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == "ferry-demo"
    with page.expect_response("**/v1/chat/completions") as info:
        _ask(page, "Reverse: hello")
    response = info.value
    assert response.headers["content-type"].startswith("text/event-stream")
    _wait_idle(page)
    events = [line for line in response.text().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3   # role, pieces, end, usage
    assert json.loads(response.request.post_data)["stream"] is True
    assert _answers(page) == ["olleh"]
    page.click("#new-chat")          # the demo model is trained on single-turn chats
    _ask(page, "What is 12+34?")
    _wait_idle(page)
    assert _answers(page) == ["46"]
    _screenshot(page, "webui-chat.png")


def test_conversations_survive_a_reload(page, demo_server):
    page.goto(demo_server.url)
    _ask(page, "Uppercase: kitchen")
    _wait_idle(page)
    page.click("#new-chat")
    _ask(page, "Reverse: abc")
    _wait_idle(page)
    page.reload()
    titles = page.locator("#conversations .title").all_inner_texts()
    assert titles == ["Reverse: abc", "Uppercase: kitchen"]
    assert _answers(page) == ["cba"]              # the open conversation stays open
    page.locator("#conversations .title", has_text="Uppercase").click()
    assert _answers(page) == ["KITCHEN"]
    page.locator("#conversations li.active .delete").click()
    assert page.locator("#conversations .title").all_inner_texts() == ["Reverse: abc"]


def test_edit_and_resend_and_regenerate(page, demo_server):
    page.goto(demo_server.url)
    _ask(page, "Reverse: hello")
    _wait_idle(page)
    page.locator(".message.user button", has_text="Edit").click()
    page.fill(".message.user textarea.editor", "Uppercase: tree")
    page.click(".message.user .save-edit")
    _wait_idle(page)
    assert page.locator(".message.user .content").all_inner_texts() == ["Uppercase: tree"]
    assert _answers(page) == ["TREE"]
    with page.expect_request("**/v1/chat/completions") as info:
        page.click("#regenerate")
    _wait_idle(page)
    sent = json.loads(info.value.post_data)
    assert [m["content"] for m in sent["messages"]] == ["Uppercase: tree"]  # the old answer is gone
    assert _answers(page) == ["TREE"]             # greedy: the same answer again


def test_settings_reach_the_request(page, demo_server):
    page.goto(demo_server.url)
    page.fill("#system-prompt", "Be exact.")
    page.fill("#temperature", "0.7")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "12")
    page.fill("#seed", "7")
    with page.expect_request("**/v1/chat/completions") as info:
        _ask(page, "Reverse: dog")
    _wait_idle(page)
    sent = json.loads(info.value.post_data)
    assert sent["messages"][0] == {"role": "system", "content": "Be exact."}
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["seed"]) == (
        0.7, 0.9, 12, 7)
    page.reload()                                 # settings are kept too
    assert page.input_value("#seed") == "7"


def test_the_json_toggle_sends_the_schema_and_the_answer_follows_it(page, demo_server):
    page.goto(demo_server.url)
    assert page.locator("#json-schema-field").is_hidden()
    page.check("#json-mode")
    page.fill("#json-schema", "{not json")
    _ask(page, "Reverse: dog")
    _wait(page, "document.querySelector('#status').textContent.includes('not valid JSON')")
    assert page.locator(".message").count() == 0            # nothing sent, the text kept
    assert page.input_value("#prompt") == "Reverse: dog"
    schema = {"enum": ["alpha", "beta"]}
    page.fill("#json-schema", json.dumps(schema))
    with page.expect_request("**/v1/chat/completions") as info:
        page.click("#send")
    _wait_idle(page)
    sent = json.loads(info.value.post_data)
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "webui", "schema": schema}}
    assert json.loads(_answers(page)[0]) in schema["enum"]   # constrained, on the demo model
    page.reload()                                 # the toggle and the schema are kept
    assert page.is_checked("#json-mode") and page.locator("#json-schema-field").is_visible()
    page.fill("#json-schema", "")                 # empty: any JSON object
    page.click("#new-chat")
    with page.expect_request("**/v1/chat/completions") as info:
        _ask(page, "Uppercase: tree")
    _wait_idle(page)
    assert json.loads(info.value.post_data)["response_format"] == {"type": "json_object"}
    assert _answers(page)[0].startswith("{")     # an object (the demo model may not close it)
    page.uncheck("#json-mode")
    with page.expect_request("**/v1/chat/completions") as info:
        page.click("#regenerate")
    _wait_idle(page)
    assert "response_format" not in json.loads(info.value.post_data)


def test_metrics_panel_shows_tokens_per_second(page, demo_server):
    page.goto(demo_server.url)
    _ask(page, "Uppercase: metrics")
    _wait_idle(page)
    # The panel polls every 2 s; the throughput window is 10 s.
    _wait(page, "Number(document.querySelector('#metric-tps').textContent) > 0", 8000)
    assert page.inner_text("#metric-ttft-p50").endswith(("ms", " s"))
    assert page.inner_text("#metric-running") == "0"


def test_model_output_is_shown_as_text(page, demo_server):
    """A (mocked) answer full of HTML: the page must show it, not run it."""
    hostile = ("<script>window.__pwned = 1</script> <img src=x onerror=\"window.__pwned=2\">"
               "\n\n**bold** [x](javascript:window.__pwned=3)\n```html\n<script>x()</script>\n```")
    chunks = [{"id": "c1", "choices": [{"index": 0, "delta": {"content": piece},
                                        "finish_reason": None}]}
              for piece in (hostile[:20], hostile[20:])]
    chunks.append({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.goto(demo_server.url)
    _ask(page, "anything")
    _wait_idle(page)
    answer = page.locator(".message.assistant .content")
    assert "<script>window.__pwned = 1</script>" in answer.inner_text()
    assert answer.locator("script, img").count() == 0
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("a").count() == 0      # a javascript: link stays text
    assert answer.locator("pre code").inner_text() == "<script>x()</script>"
    assert page.evaluate("window.__pwned") is None


def test_with_an_api_key_the_page_asks_for_it_and_stop_works(page, server):
    """The shared server (key on): the dialog, a refused key, the right one; then a long
    answer stopped half-way, which aborts the request on the server."""
    page.goto(server.url)
    page.wait_for_selector("#key-dialog:not([hidden])")
    page.fill("#key-input", "wrong")
    page.click("#key-submit")
    _wait(page, "document.querySelector('#key-error').textContent.includes('refused')")
    page.fill("#key-input", API_KEY)
    page.click("#key-submit")
    page.wait_for_selector("#key-dialog", state="hidden")
    assert page.input_value("#model") == "tiny"
    assert page.evaluate("sessionStorage.getItem('ferry.apiKey')") == API_KEY
    assert API_KEY not in page.evaluate("JSON.stringify(localStorage)")

    def long_answer(route):   # the random model may end early: ask for a long one
        body = {**json.loads(route.request.post_data), "ignore_eos": True, "max_tokens": 1900}
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", long_answer)
    aborted = metric(scrape(server.url), "llm_requests_total", status="aborted")
    _ask(page, "Tell me a long story")
    _wait(page, "document.querySelector('.message.assistant .content').textContent.length > 20")
    page.click("#stop")
    _wait_idle(page)
    assert page.locator(".message.assistant .stopped").count() == 1
    assert not page.is_disabled("#send")
    deadline = time.monotonic() + 20
    while metric(scrape(server.url), "llm_requests_total", status="aborted") == aborted:
        assert time.monotonic() < deadline, "the server never saw the stop"
        time.sleep(0.2)
    assert metric(scrape(server.url), "llm_requests_running") == 0


@pytest.fixture(scope="module")
def trace_server():
    proc = start_server(["--kv-cache-memory", "64MiB", "--debug-trace", "attention"])
    yield proc
    proc.stop()


def test_a_traced_message_shows_the_trace_of_its_final_chunk(page, trace_server):
    """The page reads the trace off the stream's final chunk (no second request): the
    heatmap has a cell per layer and head, shaded and titled from that trace's entropies,
    the flagged heads outlined, and a click lists the head's attended tokens."""
    import httpx

    page.goto(trace_server.url)
    page.check("#debug-trace")
    with page.expect_response("**/v1/chat/completions") as info:
        _ask(page, "Reverse: stone")
    _wait_idle(page)
    assert json.loads(info.value.request.post_data)["debug_trace"] is True
    assert _answers(page) == ["enots"]
    _wait(page, "document.querySelectorAll('.message.assistant .heatmap td').length > 0")
    request_id, trace = _final_chunk_trace(info.value.text())
    assert httpx.get(f"{trace_server.url}/debug/trace/{request_id}",
                     timeout=10).json()["debug_trace"] == trace       # the server's trace
    fetched = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert not [url for url in fetched if "/debug/trace/" in url]
    cells = page.locator(".heatmap td")
    assert cells.count() == trace["num_layers"] * trace["num_heads"]
    last = trace["layers"][-1]["heads"][-1]["entropy"]
    assert cells.last.get_attribute("title").endswith(
        f"mean entropy {sum(last) / len(last):.3f} nats")
    assert page.locator(".heatmap td.flagged").count() == len(
        {(a["layer"], a["head"]) for a in trace["anomalies"]})
    cells.first.click()
    items = page.locator(".heatmap .details li")
    assert items.count() == len(trace["positions"])
    first = trace["layers"][0]["heads"][0]
    assert f"(H={first['entropy'][0]:.2f})" in items.first.inner_text()
    assert "%" in items.first.inner_text()           # the attended tokens and their weights
    _screenshot(page, "webui-heatmap.png")


def _final_chunk_trace(body: str) -> tuple[str, dict]:
    """The request id and the ``debug_trace`` of the SSE body's last chunk (the one that
    finishes the choice; the usage chunk after it has no choices)."""
    chunks = [json.loads(line[len("data: "):]) for line in body.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    [traced] = [c for c in chunks if any("debug_trace" in ch for ch in c["choices"])]
    assert traced["choices"][0]["finish_reason"] == "stop"
    assert traced is [c for c in chunks if c["choices"]][-1]
    return traced["id"], traced["choices"][0]["debug_trace"]
