"""The web UI without a browser: checkpoint folders, the session (load once, retry, errors), each tab's handler against
the library it wraps, the page's error handling, and the `vlpretrain serve` command in a real process.

:func:`micro_run` (a run folder of micro stages with random weights, laid out like ``vlpretrain demo``'s) is imported
by tests/test_web_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.data.synthetic import SynthConfig, make_example
from vlpretrain.errors import UserError
from vlpretrain.web.generate import GenerateSettings, count_calls, generate
from vlpretrain.web.session import CheckpointPaths, Session, resolve_paths
from vlpretrain.web.tokens import tokenize
from vlpretrain.web.understand import ask, caption
from vlpretrain.web.uploads import NO_IMAGE, read_image, shapes_example

SIDE = 32  # the micro detokenizer's images
STEPS = 3  # its DDIM steps


def micro_run(root: Path) -> Path:
    """``root`` as a run folder: ``tokenizer/``, ``lm/`` and ``detokenizer/`` micro stages (random weights)."""
    from test_lavit_lm import micro_config, micro_tokenizer, tokenizer_folder

    from vlpretrain.configs import get_preset
    from vlpretrain.lavit.detokenizer import DetokenizerConfig
    from vlpretrain.lavit.detokenizer_task import LavitDetokenizerTask
    from vlpretrain.lavit.lm_task import LavitLMTask
    from vlpretrain.train.pretrained import save_task

    tok = tokenizer_folder(root / "tokenizer")
    cfg = micro_config(tokenizer=str(tok))
    torch.manual_seed(0)
    save_task(LavitLMTask(cfg, micro_tokenizer()), "lavit-lm", cfg, root / "lm")
    unet = {"sample_size": SIDE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
            "cross_attention_dim": 64, "norm_num_groups": 8}  # fmt: skip
    dcfg = DetokenizerConfig(tokenizer=str(tok), image_size=SIDE, unet=unet, sample_steps=STEPS,
                             scheduler=get_preset("lavit-detokenizer", "tiny").scheduler)  # fmt: skip
    save_task(LavitDetokenizerTask(dcfg), "lavit-detokenizer", dcfg, root / "detokenizer")
    return root


def shapes_png(path: Path, index: int = 3) -> Path:
    Image.fromarray(make_example(SynthConfig(), "test", index).image).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return micro_run(tmp_path_factory.mktemp("web_run"))


@pytest.fixture(scope="module")
def session(run: Path) -> Session:
    s = Session(run)
    assert s.load(), s.error
    return s


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_png(tmp_path_factory.mktemp("web_img") / "shape.png")


# ----------------------------------------------------------------------------------------------- checkpoint folders


def test_resolve_paths_of_a_run_folder_an_lm_folder_and_missing_ones(run: Path, tmp_path: Path) -> None:
    assert resolve_paths(run) == CheckpointPaths(run / "lm", run / "tokenizer", run / "detokenizer")
    assert resolve_paths(run / "lm") == CheckpointPaths(run / "lm")  # an LM folder: its recorded stages
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'nope'}: no such folder"):
        resolve_paths(tmp_path / "nope")
    partial = tmp_path / "partial"  # a demo still running: lm/ is there, without a checkpoint
    (partial / "lm").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no trained model yet"):
        resolve_paths(partial)
    shutil.copytree(run / "lm", partial / "lm", dirs_exist_ok=True)
    shutil.copytree(run / "tokenizer", partial / "tokenizer")
    (partial / "detokenizer").mkdir()  # an unfinished stage is left out
    assert resolve_paths(partial) == CheckpointPaths(partial / "lm", partial / "tokenizer", None)


def test_session_reports_a_missing_checkpoint_then_loads_it_once_it_is_there(run: Path, tmp_path: Path) -> None:
    late = tmp_path / "late"
    s = Session(late)
    assert not s.load() and "no such folder" in s.error
    assert s.status().startswith("**No model loaded.**") and str(late) in s.status()
    with pytest.raises(UserError, match="no model loaded: checkpoint .* no such folder"):
        caption(s, read_image(shapes_example(0).image))
    shutil.copytree(run, late)  # the demo finished: the next request loads it
    assert s.pipeline is s.pipeline and s.loads == 1 and s.error is None
    assert s.status().startswith(f"Loaded `{late}`") and "codebook 64" in s.status()
    assert s.default_steps == STEPS and s.pipeline.detokenizer is not None


# ----------------------------------------------------------------------------------------------- uploads


def test_read_image_accepts_files_arrays_and_rejects_bad_uploads_by_name(picture: Path, tmp_path: Path) -> None:
    from_file = read_image(str(picture))
    assert from_file.mode == "RGB" and from_file.size == (64, 64)
    assert np.array_equal(np.asarray(read_image(np.asarray(from_file))), np.asarray(from_file))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent: composited on white
    assert read_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    for empty in (None, ""):
        with pytest.raises(UserError, match=re.escape(NO_IMAGE)):
            read_image(empty)
    garbage = tmp_path / "gradio-cache" / "broken.png"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="^the upload 'broken.png' is not a usable image: ") as err:
        read_image(str(garbage))
    assert "gradio-cache" not in str(err.value)  # the base name, not the server's temporary path
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(picture.read_bytes()[:80])
    with pytest.raises(UserError, match="the upload 'cut.png' is not a usable image"):
        read_image(str(truncated))
    with pytest.raises(UserError, match="uint8"):
        read_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_shapes_example_is_the_test_split_image_with_its_ground_truth() -> None:
    example, again = shapes_example(5), shapes_example(5)
    reference = make_example(SynthConfig(), "test", 5)
    assert np.array_equal(np.asarray(example.image), reference.image)
    assert example.caption == reference.caption == again.caption
    assert (example.question, example.answer) == (reference.qa[0]["question"], reference.qa[0]["answer"])
    with pytest.raises(UserError, match="must be >= 0"):
        shapes_example(-1)


# ----------------------------------------------------------------------------------------------- handlers


def test_caption_and_ask_return_the_pipelines_text(session: Session, picture: Path) -> None:
    pipe = session.pipeline
    expected = pipe.caption([str(picture)], num_beams=2, min_new_tokens=8, max_new_tokens=36)[0]
    assert caption(session, str(picture), beams=2) == (expected or "(the model wrote an empty caption)")
    question = "how many objects are there?"
    assert ask(session, str(picture), f"  {question} ") == (pipe.ask([str(picture)], [question])[0]
                                                            or "(the model wrote an empty answer)")  # fmt: skip
    with pytest.raises(UserError, match="the question is empty"):
        ask(session, str(picture), "   ")
    with pytest.raises(UserError, match=re.escape(NO_IMAGE)):
        caption(session, None)
    with pytest.raises(UserError, match="must be >= 1"):
        caption(session, str(picture), beams=0)


def test_tokenize_shows_the_kept_patches_their_count_and_ids(session: Session, picture: Path) -> None:
    view = tokenize(session, str(picture))
    ids, keep_BN = session.pipeline.images.encode_with_masks([str(picture)])
    assert view.ids == ids[0].tolist() and view.count == len(ids[0]) == int(keep_BN.sum())
    assert view.patches == keep_BN.shape[1] and 0 < view.count < view.patches  # the micro tokenizer keeps ~40%
    side = session.pipeline.images.image_size
    assert view.overlay.size == (side * (256 // side),) * 2
    assert view.summary() == f"{view.count} visual tokens: {view.count} of {view.patches} patches kept " + (
        f"({100 * view.count / view.patches:.0f}%)"
    )
    assert [int(t) for t in view.ids_text().split()] == view.ids


def test_generate_matches_the_pipeline_and_reports_progress_to_the_end(session: Session, picture: Path) -> None:
    from vlpretrain.lavit.generate import SamplingConfig

    settings = GenerateSettings(seed=3, guidance=4.0, top_k=20, steps=2)
    reports: list[tuple[float, str]] = []
    out = generate(session, "one object: a large red circle.", None, settings, lambda f, t: reports.append((f, t)))
    pipe = session.pipeline
    codes = pipe.generate_codes(["one object: a large red circle."], [None], SamplingConfig(top_k=20), seed=3)[0]
    assert out.codes == codes.tolist() and len(out.codes) > 0
    pixels = pipe.detokenizer.decode([codes], steps=2, seed=3)[0]  # the page shows them enlarged 8x (nearest)
    expected = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert out.image.size == (SIDE * 8, SIDE * 8)
    assert np.abs(np.asarray(out.image.resize((SIDE, SIDE), Image.NEAREST), dtype=int)
                  - np.asarray(expected, dtype=int)).max() <= 1  # fmt: skip
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert [t for _, t in reports][-2:] == ["DDIM step 1/2", "DDIM step 2/2"]
    assert sum(t.startswith("visual token") for _, t in reports) == len(out.codes) + 1  # one LM step per token
    again = generate(session, "one object: a large red circle.", None, settings)
    assert again.codes == out.codes and np.array_equal(np.asarray(again.image), np.asarray(out.image))
    with_image = generate(session, "one object.", str(picture), GenerateSettings(seed=0, guidance=5.0, steps=1))
    assert with_image.image is not None and len(with_image.codes) > 0
    assert out.summary().startswith(f"{len(out.codes)} visual tokens: {out.codes[0]} ")


def test_generate_rejects_bad_requests_and_shows_tokens_without_a_detokenizer(session: Session, run: Path) -> None:
    for prompt, settings, message in [("", GenerateSettings(), "the prompt is empty"),
                                      ("a circle", GenerateSettings(top_k=-1), "top-k -1"),
                                      ("a circle", GenerateSettings(steps=0), "steps: 0 must be >= 1")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            generate(session, prompt, None, settings)
    tokens_only = Session(run / "lm", device="cpu")  # an LM folder whose config records no detokenizer
    tokens_only.load()
    assert tokens_only.pipeline.detokenizer is None and "no detokenizer" in tokens_only.status()
    out = generate(tokens_only, "a circle", None, GenerateSettings(steps=1))
    assert out.image is None and "no detokenizer loaded" in out.summary()


def test_count_calls_counts_forwards_and_removes_its_hook() -> None:
    layer, seen = torch.nn.Linear(2, 2), []
    with count_calls(layer, seen.append):
        layer(torch.zeros(1, 2))
        layer(torch.zeros(1, 2))
    layer(torch.zeros(1, 2))
    assert seen == [1, 2] and not layer._forward_hooks


# ----------------------------------------------------------------------------------------------- the page


def test_page_turns_handler_errors_into_messages_and_rejects_unreadable_uploads(picture: Path, tmp_path: Path) -> None:
    import gradio as gr
    from gradio.data_classes import ImageData

    from vlpretrain.web import layout
    from vlpretrain.web.layout import _shown, build_app, checked_upload

    missing = Session(tmp_path / "missing")
    assert not missing.load()
    app = build_app(missing)  # a page without a model still builds and says why
    status = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "status"][0]
    assert status.value.startswith("**No model loaded.**") and "no such folder" in status.value

    def bad(x: int) -> int:
        raise UserError(f"bad {x}")

    with pytest.raises(gr.Error, match="bad 3"):
        _shown(bad)(3)
    with pytest.raises(gr.Error, match=r"internal error \(ZeroDivisionError"):
        _shown(lambda: 1 / 0)()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no pixels here")
    upload = checked_upload(gr.Image(type="filepath", image_mode=None, render=False))
    with pytest.raises(gr.Error, match="'holiday.png' is not an image this app can read"):
        upload.preprocess(ImageData(path=str(broken), orig_name="holiday.png"))
    assert upload.preprocess(ImageData(path=str(picture), orig_name="fine.png")) == str(picture)
    assert not list(Path(layout.__file__).parent.glob("*.pyi"))  # gradio writes stubs for Component subclasses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_binds_the_loopback_and_shows_a_missing_checkpoint_in_the_page(tmp_path: Path) -> None:
    from vlpretrain.web.server import QUIET_ENV, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    port, missing = _free_port(), tmp_path / "no-run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vlpretrain", "serve", "--checkpoint", str(missing), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, config = time.monotonic() + 60, None
        while config is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        if config is None:
            server.kill()
            pytest.fail(f"no page on port {port} within 60 s: {server.communicate(timeout=30)[0][-3000:]}")
        texts = [c["props"].get("value") for c in config["components"] if c["props"].get("elem_id") == "status"]
        assert texts and texts[0].startswith("**No model loaded.**") and str(missing) in texts[0]
        assert config["title"] == "vlpretrain: LaVIT on the shapes world"
        assert not config.get("analytics_enabled") and config.get("footer_links") == ["api", "settings"]
        with socket.socket() as s:  # bound to the loopback only: the machine's other addresses refuse
            outside = socket.gethostbyname(socket.gethostname())
            if not is_loopback(outside):
                assert s.connect_ex((outside, port)) != 0
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out and "no model loaded" in out
    assert QUIET_ENV["GRADIO_ANALYTICS_ENABLED"] == "False"
