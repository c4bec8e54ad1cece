"""`cocosnet app`: the applications of the CoCosNet papers in a browser (Gradio), on 127.0.0.1 by default.

    from pipeline.app import create, launch
    from pipeline.inference import load

    app = create(load("models"), "data/prepared")      # gr.Blocks
    url = launch(app, host="127.0.0.1", port=7860)      # serving in the background
    app.block_thread()                                  # until interrupted

- painter: paint the input map with the model's classes (named where the dataset has names), fill regions,
  undo, clear; or load a map, or (edge models) derive it from a photo with the dataset's edge extractor
- exemplar: retrieved from the prepared dataset (data/prepared: its photos, maps and the retrieval descriptors
  the shard stage pairs with) by the descriptor of the painted map, shown as thumbnails; or uploaded
- translate: the warped exemplar and the output side by side
- edit: a photo's own map goes onto the canvas, the photo stays the exemplar: repaint a region, translate

pipeline.app.canvas (maps <-> canvas), pipeline.app.pool (retrieval) import no Gradio; pipeline.app.ui does.
Mask models and 1-channel edge models can be painted; pose and multi-channel edge maps cannot.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.app.canvas import classes_for
from pipeline.data.errors import DataError

if TYPE_CHECKING:
    import gradio as gr

    from pipeline.app.pool import ExemplarPool
    from pipeline.inference import Translator

DEFAULT_DATA = Path("data/prepared")


def open_pool(data: str | Path | None, label_nc: int) -> tuple["ExemplarPool | None", str]:
    """The exemplar pool of a prepared dataset, or None and the reason shown on the page."""
    from pipeline.app.pool import ExemplarPool

    if data is None:
        return None, "no prepared data given (--data)"
    if not (Path(data) / "index.json").is_file():
        return None, f"{data} holds no prepared dataset (index.json; run dvc repro prepare)"
    pool = ExemplarPool(data)
    reason = pool.mismatch(label_nc)
    return (None, reason) if reason else (pool, "")


def paint_task(translator: "Translator", pool: "ExemplarPool | None") -> str:
    """mask or edge: what the model's input maps are (its recorded task, the dataset's, or its channel count)."""
    task = translator.task or (pool.task if pool is not None else None)
    task = task or ("edge" if translator.cfg.label_nc == 1 else "mask")
    if task == "pose" or (task == "edge" and translator.cfg.label_nc != 1):
        raise DataError(f"the app paints class maps and 1-channel edge maps; this {task} model takes "
                        f"{translator.cfg.label_nc} channels (use cocosnet translate with .npy or keypoint inputs)")
    return task


def create(translator: "Translator", data: str | Path | None = DEFAULT_DATA, model_ref: str = "") -> "gr.Blocks":
    """The app's page for a loaded model; data: a prepared dataset folder for the exemplar pool (optional)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (and none possible offline)
    from pipeline.app.ui import build_app

    pool, note = open_pool(data, translator.cfg.label_nc)
    task = paint_task(translator, pool)
    classes = classes_for(translator.cfg.label_nc, task, pool.source if pool is not None else None)
    return build_app(translator, classes, pool, model_ref=model_ref, pool_note=note)


def launch(app: "gr.Blocks", host: str = "127.0.0.1", port: int = 7860) -> str:
    """Start serving the page (one translation at a time) in the background; -> its URL. app.block_thread()
    waits until interrupted, app.close() stops it."""
    import gradio as gr

    from pipeline.app.ui import CSS

    # System fonts: the default theme fetches web fonts, which a closed network cannot reach.
    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=False,
                           max_file_size="50mb", ssr_mode=False, mcp_server=False, pwa=False, footer_links=[],
                           theme=theme, css=CSS, quiet=True)
    return url


__all__ = ["DEFAULT_DATA", "create", "launch", "open_pool"]
