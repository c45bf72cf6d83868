"""The gradio page: one image (uploaded or drawn from the shapes world) and a tab per task, wired to the handlers.

Every model call shares one concurrency group of size 1 (``MODEL_QUEUE``): requests wait in gradio's queue and run
one after another on the one loaded :class:`~vlpretrain.web.session.Session`. A :class:`~vlpretrain.errors.UserError`
from a handler becomes a gradio error toast with its one-line message; anything else is logged with its traceback and
shown as an internal error. Element ids (``elem_id``) are stable: the browser test and docs/web.md use them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr
from PIL import Image

from vlpretrain.errors import UserError
from vlpretrain.web import generate as gen
from vlpretrain.web import understand
from vlpretrain.web.session import Session
from vlpretrain.web.tokens import tokenize
from vlpretrain.web.uploads import describe_example, shapes_example

log = logging.getLogger(__name__)
MODEL_QUEUE = "models"
TITLE = "vlpretrain: LaVIT on the shapes world"
DEFAULT_PROMPT = "one object: a large red circle in the center."
DEFAULT_QUESTION = "how many objects are there?"
# shapes-world images are small (64 px): show them enlarged with sharp pixels
CSS = """
#image img, #tokens-overlay img, #generate-output img { image-rendering: pixelated; }
#image img { width: 100%; height: 100%; object-fit: contain; }
"""


def checked_upload(image: gr.Image) -> gr.Image:
    """``image``, made to name an upload Pillow cannot open (gradio opens uploads before any handler sees them)
    instead of failing with a bare "Error". Wrapped on the instance: a subclass would make gradio write a .pyi
    stub next to this file."""
    preprocess = image.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            log.info("rejected upload %s: %s", name, err)
            raise gr.Error(f"'{name}' is not an image this app can read (PNG, JPEG, WebP, ...)",
                           print_exception=False) from err  # fmt: skip

    image.preprocess = checked
    return image


def _shown(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` with its errors turned into messages in the page (see the module docstring)."""

    @functools.wraps(handler)  # keeps the signature: gradio finds the gr.Progress parameter in it
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from err
        except gr.Error:
            raise
        except Exception as err:
            log.exception("internal error in %s", handler.__name__)
            raise gr.Error(f"internal error ({type(err).__name__}: {err}); the server log has the details",
                           print_exception=False) from err  # fmt: skip

    return call


def _image_column() -> gr.Image:
    """The shared image: upload it, or draw test image N of the shapes world (with its ground truth)."""
    image = checked_upload(gr.Image(label="Image", type="filepath", image_mode=None, format="png", height=300,
                                    sources=["upload", "clipboard"], elem_id="image"))  # fmt: skip
    with gr.Row():
        index = gr.Number(0, label="Shapes-world test image", precision=0, minimum=0, elem_id="example-index")
        draw = gr.Button("Draw it", elem_id="draw-example")
    truth = gr.Markdown("", elem_id="ground-truth")

    def draw_example(n: float) -> tuple[Image.Image, str]:
        example = shapes_example(int(n or 0))
        return example.image, describe_example(example)  # 64 px, shown enlarged (CSS); saved as PNG: lossless

    draw.click(_shown(draw_example), [index], [image, truth], api_name="example")
    return image


def _caption_tab(session: Session, image: gr.Image) -> None:
    with gr.Tab("Caption", id="caption"):
        beams = gr.Slider(1, 5, value=2, step=1, label="Beams")
        run = gr.Button("Caption", variant="primary", elem_id="caption-run")
        out = gr.Textbox(label="Caption", interactive=False, lines=3, elem_id="caption-output")
    run.click(_shown(lambda im, b: understand.caption(session, im, int(b))), [image, beams], [out],
              api_name="caption", concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def _ask_tab(session: Session, image: gr.Image) -> None:
    with gr.Tab("Ask", id="ask"):
        question = gr.Textbox(DEFAULT_QUESTION, label="Question", elem_id="ask-question")
        run = gr.Button("Ask", variant="primary", elem_id="ask-run")
        out = gr.Textbox(label="Answer", interactive=False, elem_id="ask-output")
    handler = _shown(lambda im, q: understand.ask(session, im, q))
    for event in (run.click, question.submit):
        event(handler, [image, question], [out], api_name="ask" if event == run.click else False,
              concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def _tokens_tab(session: Session, image: gr.Image) -> None:
    with gr.Tab("Tokens", id="tokens"):
        run = gr.Button("Tokenise", variant="primary", elem_id="tokens-run")
        with gr.Row():
            overlay = gr.Image(label="Keep mask (kept: outlined)", type="pil", format="png",
                               interactive=False, height=300, elem_id="tokens-overlay")  # fmt: skip
            with gr.Column():
                count = gr.Textbox(label="Token count", interactive=False, elem_id="tokens-count")
                ids = gr.Textbox(label="Token ids (patch order)", interactive=False, lines=6, elem_id="tokens-ids")

    def show(im: Any) -> tuple[Image.Image, str, str]:
        view = tokenize(session, im)
        return view.overlay, view.summary(), view.ids_text()

    run.click(_shown(show), [image], [overlay, count, ids], api_name="tokenize", concurrency_limit=1,
              concurrency_id=MODEL_QUEUE)  # fmt: skip


def _generate_tab(session: Session, image: gr.Image) -> None:
    with gr.Tab("Generate", id="generate"):
        prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", elem_id="generate-prompt")
        with_image = gr.Checkbox(False, label="Put the image before the prompt (a multimodal prompt)",
                                 elem_id="generate-with-image")  # fmt: skip
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, elem_id="generate-seed")
            guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="Guidance scale (LM)",
                                 elem_id="generate-guidance")  # fmt: skip
            top_k = gr.Slider(0, 500, value=50, step=1, label="Top-k (0 = off)", elem_id="generate-top-k")
            steps = gr.Slider(1, 100, value=session.default_steps, step=1, label="Diffusion steps",
                              elem_id="generate-steps")  # fmt: skip
        run = gr.Button("Generate", variant="primary", elem_id="generate-run")
        picture = gr.Image(label="Generated image", type="pil", format="png", interactive=False, height=300,
                           elem_id="generate-output")  # fmt: skip
        codes = gr.Textbox(label="Visual tokens", interactive=False, lines=3, elem_id="generate-codes")

    def draw(text: str, use_image: bool, im: Any, s: float, g: float, k: float, n: float,
             progress: gr.Progress = gr.Progress()) -> tuple[Image.Image | None, str]:  # fmt: skip
        settings = gen.GenerateSettings(int(s or 0), float(g), int(k), int(n))
        result = gen.generate(session, text, im if use_image else None, settings,
                              lambda fraction, what: progress(fraction, desc=what))  # fmt: skip
        return result.image, result.summary()

    # the official guidance: 4.0 for a text prompt, 5.0 with an image in it
    with_image.change(lambda on: 5.0 if on else 4.0, [with_image], [guidance], api_name=False, queue=False)
    run.click(_shown(draw), [prompt, with_image, image, seed, guidance, top_k, steps], [picture, codes],
              api_name="generate", concurrency_limit=1, concurrency_id=MODEL_QUEUE)  # fmt: skip


def build_app(session: Session) -> gr.Blocks:
    """The page for ``session`` (its models are loaded, or the reason they are not is shown at the top)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}")
        gr.Markdown(session.status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=2):
                image = _image_column()
            with gr.Column(scale=3), gr.Tabs():
                _caption_tab(session, image)
                _ask_tab(session, image)
                _tokens_tab(session, image)
                _generate_tab(session, image)
    return app


__all__ = ["CSS", "MODEL_QUEUE", "TITLE", "checked_upload", "build_app"]
