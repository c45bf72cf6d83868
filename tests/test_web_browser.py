"""The web UI in a real browser: headless Chromium (Debian's, driven by Playwright) uploads a shapes-world image, gets a
caption, an answer, the token view and a generated image, checks each against the library's own result, and checks
that nothing (page or server) tries to reach beyond 127.0.0.1.

Screenshots go to the test's folder, and also to $VLPRETRAIN_WEB_SHOTS when set (docs/images is made that way, with
$VLPRETRAIN_WEB_CHECKPOINT=runs/demo: see docs/web.md). Skipped, with the reason, without Chromium or Playwright.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_web import micro_run, shapes_png

from vlpretrain.web.generate import GenerateSettings, generate
from vlpretrain.web.layout import DEFAULT_PROMPT, DEFAULT_QUESTION
from vlpretrain.web.tokens import tokenize
from vlpretrain.web.understand import ask, caption
from vlpretrain.web.uploads import shapes_example

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_MS = 60_000  # generous: two shared cores
EXAMPLE = 5  # the shapes-world test image drawn with "Draw it"
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make report-deps` (root, Debian) installs it"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing"),  # its ETA code on pandas 3
]

# Collects the progress texts gradio shows over the output while the Generate request runs.
WATCH_PROGRESS = """() => { window.progressSeen = [];
  new MutationObserver(() => { const text = document.querySelector('#generate-output')?.innerText || '';
    if (/DDIM step|visual token/.test(text)) window.progressSeen.push(text.replace(/\\s+/g, ' ')); })
  .observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def _local(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_outbound(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse (and record) every connection this process tries to make to anything but the loopback."""
    tried: list[str] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else ""
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(str(host)):
            tried.append(str(address))
            raise ConnectionRefusedError(f"test: no outbound connections ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return tried


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=True, animations="disabled")  # finished fades: what a person sees
    if os.environ.get("VLPRETRAIN_WEB_SHOTS"):
        folder = Path(os.environ["VLPRETRAIN_WEB_SHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)


def _expected(session, image: Path) -> dict:
    """The library's results for what the browser will ask, computed before it asks: the session serves one request at
    a time, so the test must not use it while the server does."""
    steps, example = max(20, session.default_steps), shapes_example(EXAMPLE)  # steps: enough to watch the progress
    return {
        "caption": caption(session, str(image)),
        "answer": ask(session, str(image), DEFAULT_QUESTION),
        "tokens": tokenize(session, str(image)),
        "steps": steps,
        "drawn": generate(session, DEFAULT_PROMPT, None, GenerateSettings(seed=1, steps=steps)),
        "example": example,
        "example_caption": caption(session, example.image),
    }


def _understand(page, expect, want: dict, shots: Path) -> None:
    """Caption, Ask and Tokens tabs on the uploaded image."""
    page.locator("#caption-run").click()
    expect(page.locator("#caption-output textarea")).to_have_value(want["caption"])
    _shot(page, shots, "caption")
    page.get_by_role("tab", name="Ask").click()
    page.locator("#ask-run").click()
    expect(page.locator("#ask-output textarea")).to_have_value(want["answer"])
    page.get_by_role("tab", name="Tokens").click()
    page.locator("#tokens-run").click()
    view = want["tokens"]
    expect(page.locator("#tokens-count textarea")).to_have_value(view.summary())
    expect(page.locator("#tokens-ids textarea")).to_have_value(view.ids_text())
    overlay = page.locator("#tokens-overlay img")
    expect(overlay).to_be_visible()
    assert overlay.evaluate("img => img.naturalWidth") == view.overlay.width
    _shot(page, shots, "tokens")


def _fill_until_kept(page, field, value: str, tries: int = 5) -> None:
    """Type ``value`` into a number field until it keeps it: a tab's components can mount a moment after the tab
    shows and reset a value typed before (seen as a 1-in-3 flake of this test)."""
    for _ in range(tries):
        field.fill(value)
        field.blur()
        page.wait_for_timeout(500)
        if field.input_value() == value:
            return


def _generate(page, expect, want: dict, shots: Path) -> None:
    """Generate tab with seed 1 and more DDIM steps than the default: the result and the progress shown meanwhile."""
    page.get_by_role("tab", name="Generate").click()
    expect(page.locator("#generate-run")).to_be_visible()
    page.wait_for_load_state("networkidle")  # the tab's components are mounted
    seed, steps = page.locator("#generate-seed input"), want["steps"]
    _fill_until_kept(page, seed, "1")
    _fill_until_kept(page, page.locator("#generate-steps input[type=number]"), str(steps))
    expect(seed).to_have_value("1")
    expect(page.locator("#generate-steps input[type=range]")).to_have_value(str(steps))  # the slider took it
    page.evaluate(WATCH_PROGRESS)
    page.locator("#generate-run").click()
    expect(page.locator("#generate-codes textarea")).to_have_value(want["drawn"].summary())
    result = page.locator("#generate-output img")
    expect(result).to_be_visible()
    assert result.evaluate("img => img.naturalWidth") == want["drawn"].image.width
    seen = page.evaluate("window.progressSeen")
    assert any(f"/{steps}" in text for text in seen), seen[-5:]  # "DDIM step i/N - p%" over the output
    _shot(page, shots, "generate")


def _bad_upload(page, expect, broken: Path, shots: Path) -> None:
    """A file that is no image: a message in the page, not a traceback."""
    page.reload(wait_until="networkidle")
    page.locator("#image input[type=file]").set_input_files(str(broken))
    page.locator("#caption-run").click()
    toast = page.locator(".toast-body").filter(has_text=f"'{broken.name}' is not an image this app can read")
    expect(toast).to_be_visible()
    expect(toast).to_have_css("opacity", "1")  # faded in
    assert "Traceback" not in page.content()
    _shot(page, shots, "error")


def _draw_example(page, expect, want: dict) -> None:
    """Draw it: a shapes-world test image with its ground truth, which the Caption tab then reads (pixels intact)."""
    page.locator("#example-index input").fill(str(EXAMPLE))
    page.locator("#example-index input").blur()
    expect(page.locator("#example-index input")).to_have_value(str(EXAMPLE))
    page.locator("#draw-example").click()
    expect(page.locator("#ground-truth")).to_contain_text(want["example"].caption)
    page.locator("#caption-run").click()
    expect(page.locator("#caption-output textarea")).to_have_value(want["example_caption"])


def test_web_ui_in_headless_chromium(tmp_path: Path, no_outbound: list[str]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: `pip install -e '.[dev]'`")
    from vlpretrain.web.server import launch

    checkpoint = os.environ.get("VLPRETRAIN_WEB_CHECKPOINT") or micro_run(tmp_path / "run")
    image, broken = shapes_png(tmp_path / "shapes.png"), tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are no image")
    app = launch(checkpoint, "127.0.0.1", _free_port(), block=False)
    session, expect, outside = app.session, sync_api.expect, []
    want = _expected(session, image)
    expect.set_options(timeout=WAIT_MS)
    try:
        with sync_api.sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            except sync_api.Error as err:  # this Chromium is not one Playwright can drive: not our app's fault
                pytest.skip(f"playwright cannot start {CHROMIUM}: {str(err).splitlines()[0]}")
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(WAIT_MS)

            def only_local(route) -> None:
                if _local(urlsplit(route.request.url).hostname or ""):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(app.local_url, wait_until="networkidle")
            expect(page.locator("#status")).to_contain_text(f"Loaded {checkpoint} on cpu")
            page.locator("#image input[type=file]").set_input_files(str(image))
            expect(page.locator("#image img")).to_be_visible()
            _understand(page, expect, want, tmp_path)
            _generate(page, expect, want, tmp_path)
            _bad_upload(page, expect, broken, tmp_path)
            _draw_example(page, expect, want)
            browser.close()
    finally:
        app.close()
    assert session.loads == 1  # every request used the models loaded at start
    assert outside == [] and no_outbound == []
    assert all((tmp_path / f"web-{n}.png").stat().st_size > 10_000 for n in ("caption", "tokens", "generate", "error"))
