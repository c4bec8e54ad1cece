"""The page: a Gradio Blocks app around a Translator, an exemplar pool and the paintable classes.

Every handler turns what a user can get wrong (a file that is not an image, a map with foreign class ids, no
exemplar yet) into a message on the page (gr.Error); anything unexpected is logged with its traceback on the
server and shown on the page as one line.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import numpy as np

from pipeline.app.canvas import (Classes, bucket_fill, canvas_scale, decode, ids_of_map, model_map, photo_edges,
                                 render)
from pipeline.app.pool import ExemplarPool
from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import read_photo
from pipeline.inference import Translator, read_map_array

log = logging.getLogger(__name__)
HISTORY = 30  # map changes the Undo button can take back
THUMBNAIL = 128  # pixels: small pool images are enlarged (nearest) for the gallery
CSS = """
#map-view img, #chosen img, #warped img, #output img {
    image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.85em; max-height: 9em; overflow-y: auto; }
.legend span { white-space: nowrap; }
.legend i { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888; vertical-align: -0.1em; }
"""
HELP = """\
**Paint** the input map on the canvas: the brush's colours are the model's classes (legend below the canvas);
the brush tool sets the size, the toolbar has undo, redo and clear. **Fill** a region: pick a fill class and click
the region in the map preview. **Exemplar**: retrieve photos whose maps resemble yours from the dataset, or upload
one. **Edit a photo**: choose it as the exemplar, press *Edit this photo* to put its own map on the canvas, repaint
a region and translate: the photo is its own exemplar, so the edit keeps its style."""


def on_page(handler: Callable) -> Callable:
    """Errors a user can act on become their message on the page; others one line (traceback in the log)."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except (DataError, SkipSample, ValueError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise gr.Error(f"{handler.__name__} failed: {type(exc).__name__}: {exc}", print_exception=False) from None

    return wrapper


def upload_name(path: str) -> str:
    return Path(path).name


@contextlib.contextmanager
def naming_the_upload(path: str, what: str) -> Iterator[None]:
    """Reading errors become page messages that name the uploaded file, not Gradio's copy of it."""
    try:
        yield
    except SkipSample as exc:
        reason = exc.reason.replace(path, upload_name(path))
        raise gr.Error(f"{upload_name(path)} is not a usable {what}: {reason}", print_exception=False) from None
    except (DataError, ValueError) as exc:
        raise gr.Error(str(exc).replace(path, upload_name(path)), print_exception=False) from None


def legend_html(classes: Classes) -> str:
    items = "".join(f'<span><i style="background:{colour}"></i> {classes.label(k)}</span>'
                    for k, colour in enumerate(classes.hex))
    return f'<div class="legend">{items}</div>'


def enlarge(photo: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """Nearest-neighbour enlargement of a small image (pixels stay visible, nothing is invented)."""
    factor = max(1, side // max(photo.shape[:2]))
    return np.repeat(np.repeat(photo, factor, axis=0), factor, axis=1)


def build_app(translator: Translator, classes: Classes, pool: ExemplarPool | None, *, model_ref: str,
              pool_note: str = "") -> gr.Blocks:
    """The page for one model. pool: the exemplar pool, or None (pool_note says why)."""
    cfg = translator.cfg
    size = tuple(cfg.image_size)
    scale = canvas_scale(size)
    task = "edge" if classes.edge else "mask"
    blank = np.zeros(size, np.int64)

    def editor_value(ids: np.ndarray) -> dict[str, Any]:
        return {"background": render(ids, classes, scale), "layers": [], "composite": None}

    def current_map(editor: dict | None) -> np.ndarray:
        image = (editor or {}).get("composite")
        image = (editor or {}).get("background") if image is None else image
        return blank if image is None else decode(image, classes, size)

    def replaced(editor: dict | None, history: list, ids: np.ndarray) -> tuple[dict, list, np.ndarray]:
        """A new map on the canvas; the old one is kept for Undo. -> (editor, history, preview)."""
        history = (history + [current_map(editor).astype(np.uint8)])[-HISTORY:]  # ids < MAX_CLASSES = 256
        return editor_value(ids), history, render(ids, classes, scale)

    # ------------------------------------------------------------ handlers

    @on_page
    def preview(editor):
        return render(current_map(editor), classes, scale)

    @on_page
    def fill(editor, history, fill_class, evt: gr.SelectData):
        x, y = evt.index
        ids = current_map(editor)
        row, col = min(int(y) // scale, size[0] - 1), min(int(x) // scale, size[1] - 1)
        return replaced(editor, history, bucket_fill(ids, row, col, int(fill_class)))

    @on_page
    def clear(editor, history):
        return replaced(editor, history, blank)

    @on_page
    def undo(history):
        if not history:
            raise gr.Error("nothing to undo (strokes are undone with the canvas's own undo button)")
        ids = history[-1]
        return editor_value(ids), history[:-1], render(ids, classes, scale)

    @on_page
    def load_map(path, editor, history):
        with naming_the_upload(path, "input map"):
            array = read_map_array(path, task)
            try:
                ids = ids_of_map(array, classes, size)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return replaced(editor, history, ids)

    @on_page
    def edges_from_photo(path, editor, history):
        with naming_the_upload(path, "photo"):
            return replaced(editor, history, photo_edges(read_photo(path), size))

    @on_page
    def retrieve(editor, k):
        if pool is None:
            raise gr.Error(f"no exemplar pool: {pool_note}")
        found = pool.nearest(model_map(current_map(editor), classes), int(k))
        items = [(enlarge(pool.photo(i)), f"{pool.name(i)} ({distance:.2f})") for i, distance in found]
        return items, [i for i, _ in found]

    def pool_exemplar(i: int) -> dict[str, Any]:
        return {"photo": pool.photo(i), "map": pool.input_map(i), "name": f"{pool.name(i)} (dataset)"}

    @on_page
    def pick(retrieved, evt: gr.SelectData):
        exemplar = pool_exemplar(retrieved[evt.index])
        return exemplar, enlarge(exemplar["photo"], 256), f"Exemplar: {exemplar['name']}"

    @on_page
    def upload_exemplar(path):
        if not path:
            return None, None, "Exemplar: none"
        with naming_the_upload(path, "exemplar photo"):
            photo = read_photo(path)
        exemplar = {"photo": photo, "map": None, "name": upload_name(path)}
        note = "" if classes.edge else " - now upload its map too (mask models need the exemplar's own map)"
        return exemplar, photo, f"Exemplar: {exemplar['name']}{note}"

    @on_page
    def upload_exemplar_map(path, exemplar):
        if not path:
            return exemplar, gr.skip()
        if exemplar is None:
            raise gr.Error("upload the exemplar photo first, then its map")
        with naming_the_upload(path, "exemplar map"):
            translator.load_map(path, task)  # checked now (class ids, channels), so the message names the file
            array = read_map_array(path, task)
        return {**exemplar, "map": array}, f"Exemplar: {exemplar['name']} with map {upload_name(path)}"

    @on_page
    def edit_photo(exemplar, editor, history):
        if exemplar is None:
            raise gr.Error("choose the photo to edit first: pick one in the pool gallery or upload it (and its map)")
        if exemplar["map"] is not None:
            ids = ids_of_map(np.asarray(exemplar["map"]), classes, size)
        elif classes.edge:
            ids = photo_edges(exemplar["photo"], size)
        else:
            raise gr.Error("upload the photo's own map too: editing starts from the photo's map")
        note = f"Editing {exemplar['name']}: repaint a region, then translate (the photo stays the exemplar)"
        return (*replaced(editor, history, ids), note)

    @on_page
    def translate(editor, exemplar, progress=gr.Progress()):
        progress(0.05, desc="reading the map and the exemplar")
        input_map = model_map(current_map(editor), classes)
        note = ""
        if exemplar is None:
            if pool is None:
                raise gr.Error(f"choose an exemplar: upload a photo (no exemplar pool: {pool_note})")
            exemplar = pool_exemplar(pool.nearest(input_map, 1)[0][0])
            note = " (the nearest pool image: none was chosen)"
        if exemplar["map"] is None and not classes.edge:
            raise gr.Error("this model needs the exemplar's own map: upload it ('...and its own map'), "
                           "or pick an exemplar from the pool")
        prepared = translator.prepare(input_map, exemplar["photo"], exemplar["map"])
        progress(0.3, desc="correspondence and generator")
        start = time.perf_counter()
        result = translator.run([prepared])[0]
        seconds = time.perf_counter() - start
        progress(1.0, desc="done")
        h, w = size
        status = (f"Translated {h}x{w} in {seconds:.2f} s on {translator.device.type}; "
                  f"exemplar {exemplar['name']}{note}")
        return result.warped[-1], result.image, exemplar, enlarge(exemplar["photo"], 256), status

    # ------------------------------------------------------------ layout

    h, w = size
    pool_line = (f"exemplar pool: {len(pool)} images of {pool.source}" if pool is not None
                 else f"no exemplar pool ({pool_note})")
    with gr.Blocks(title="CoCosNet app", delete_cache=(3600, 3600)) as app:  # uploads and results: an hour
        gr.Markdown(f"## CoCosNet: paint, pick an exemplar, translate\n`{model_ref}`: {h}x{w}, "
                    f"{len(classes) if not classes.edge else 1}-channel {task} input; {pool_line}\n\n{HELP}")
        history = gr.State([])
        exemplar = gr.State(None)
        retrieved = gr.State([])
        with gr.Row():
            with gr.Column(scale=5, min_width=420):
                editor = gr.ImageEditor(
                    value=editor_value(blank), label="Input map", elem_id="canvas", type="numpy", image_mode="RGBA",
                    format="png", canvas_size=(w * scale, h * scale), fixed_canvas=True, sources=(), transforms=(),
                    layers=False, height=560,
                    brush=gr.Brush(colors=classes.hex, default_color=classes.hex[1], color_mode="fixed",
                                   default_size=max(2, 3 * scale)),
                    eraser=gr.Eraser(default_size=max(2, 3 * scale)))
                gr.HTML(legend_html(classes))
                with gr.Row():
                    with gr.Column(min_width=160):
                        fill_class = gr.Dropdown([(classes.label(k), k) for k in range(len(classes))], value=1,
                                                 label="Fill class", elem_id="fill-class")
                        undo_button = gr.Button("Undo fill / clear / load", elem_id="undo", size="sm")
                        clear_button = gr.Button("Clear map", elem_id="clear", size="sm")
                        map_file = gr.UploadButton("Load a map (index PNG, edge image, .npy)", elem_id="map-upload",
                                                   size="sm")
                        edge_photo = gr.UploadButton("Edges of a photo (the dataset's Canny)", size="sm",
                                                     elem_id="edge-photo-upload", visible=classes.edge)
                    map_view = gr.Image(render(blank, classes, scale), label="Click a region to fill it",
                                        elem_id="map-view", interactive=False, height=230, buttons=[], min_width=160,
                                        format="png")
            with gr.Column(scale=4, min_width=320):
                with gr.Row():
                    k = gr.Slider(1, 12, value=6, step=1, label="Exemplars to retrieve", min_width=120)
                    retrieve_button = gr.Button("Retrieve exemplars like this map", elem_id="retrieve",
                                                interactive=pool is not None, min_width=120)
                gallery = gr.Gallery(label="Exemplar pool: nearest by descriptor (click one to choose it)",
                                     elem_id="pool", columns=3, height=260, allow_preview=False, object_fit="contain",
                                     format="png")
                with gr.Row():
                    exemplar_file = gr.UploadButton("Or upload an exemplar photo", elem_id="exemplar-upload",
                                                    size="sm")
                    exemplar_map_file = gr.UploadButton("...and its own map", elem_id="exemplar-map-upload",
                                                        size="sm", visible=not classes.edge)
                with gr.Row():
                    chosen = gr.Image(label="Exemplar", elem_id="chosen", interactive=False, height=170, buttons=[],
                                      min_width=120, format="png")
                    with gr.Column(min_width=120):
                        exemplar_note = gr.Markdown("Exemplar: none", elem_id="exemplar-note")
                        edit_button = gr.Button("Edit this photo: its map onto the canvas", elem_id="edit", size="sm")
            with gr.Column(scale=4, min_width=320):
                translate_button = gr.Button("Translate", variant="primary", elem_id="translate")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    warped = gr.Image(label="Warped exemplar", elem_id="warped", interactive=False, height=260,
                                      format="png", buttons=["download"], min_width=150)
                    output = gr.Image(label="Output", elem_id="output", interactive=False, height=260, format="png",
                                      buttons=["download"], min_width=150)

        # ------------------------------------------------------------ events
        quiet = {"show_progress": "hidden"}
        editor.change(preview, editor, map_view, trigger_mode="always_last", **quiet)
        canvas_outputs = [editor, history, map_view]
        map_view.select(fill, [editor, history, fill_class], canvas_outputs, **quiet)
        clear_button.click(clear, [editor, history], canvas_outputs, **quiet)
        undo_button.click(undo, history, canvas_outputs, **quiet)
        map_file.upload(load_map, [map_file, editor, history], canvas_outputs)
        edge_photo.upload(edges_from_photo, [edge_photo, editor, history], canvas_outputs)
        retrieve_button.click(retrieve, [editor, k], [gallery, retrieved])
        gallery.select(pick, retrieved, [exemplar, chosen, exemplar_note], **quiet)
        exemplar_file.upload(upload_exemplar, exemplar_file, [exemplar, chosen, exemplar_note])
        exemplar_map_file.upload(upload_exemplar_map, [exemplar_map_file, exemplar], [exemplar, exemplar_note])
        edit_button.click(edit_photo, [exemplar, editor, history], [*canvas_outputs, exemplar_note])
        translate_button.click(translate, [editor, exemplar], [warped, output, exemplar, chosen, status])
    return app
