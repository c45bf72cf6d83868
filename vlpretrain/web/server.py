"""Launch the web UI: load the models once, build the page, serve it on the loopback with nothing sent outside.

What gradio would otherwise reach out for, and what we do about it:

- usage analytics and its version check (api.gradio.app): ``GRADIO_ANALYTICS_ENABLED=False`` and
  ``analytics_enabled=False``; Hugging Face telemetry off (``HF_HUB_DISABLE_TELEMETRY``), hub offline;
- web fonts from Google Fonts (the default theme's): a theme with system fonts only;
- share links (a tunnel through gradio.live): ``share=False``, always;
- server-side rendering through Node: off; the page is the static frontend served by this process.

The browser test (tests/test_web_browser.py) records every request the page makes and fails on any that leaves
127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from vlpretrain.errors import UserError

QUIET_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "GRADIO_SSR_MODE": "False",
}
MAX_UPLOAD = "20mb"


def quiet_environment() -> None:
    """Switch off gradio's analytics and outbound calls; set before gradio is imported (it reads some at import)."""
    os.environ.update(QUIET_ENV)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _theme() -> Any:
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def launch(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           device: str = "cpu") -> Any:  # fmt: skip
    """Serve the UI for ``checkpoint`` at ``http://host:port``; returns the running gradio app (``app.close()`` stops
    it) when ``block`` is False, else serves until interrupted.

    A checkpoint that cannot be loaded still serves the page, which says why at the top (and loads it on the next
    request once it is there).

    Raises:
        UserError: the port is taken or the address cannot be bound.
    """
    quiet_environment()
    from vlpretrain.web.layout import CSS, build_app
    from vlpretrain.web.session import Session

    session = Session(checkpoint, device)
    session.load()
    app = build_app(session)
    app.queue(default_concurrency_limit=1, max_size=32)
    try:
        app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                   ssr_mode=False, theme=_theme(), css=CSS, footer_links=["api", "settings"], run_history=False,
                   max_file_size=MAX_UPLOAD, enable_monitoring=False, pwa=False, mcp_server=False,
                   show_error=False, quiet=not block)  # fmt: skip
    except OSError as err:  # gradio: "Cannot find empty port in range ..."
        raise UserError(f"--host {host} --port {port}: cannot serve there: {err}") from err
    app.session = session  # for tests and callers: the loaded models (``session.loads`` counts loads)
    return app


__all__ = ["QUIET_ENV", "is_loopback", "launch", "quiet_environment"]
