"""`cocosnet app` in headless Chromium: paint strokes, retrieve and pick an exemplar, translate, read the output back;
edit mode; a non-image upload gets the page's message. Screenshots go to reports/app_*.png (docs/figures/app.png is
one of them). The model is the tiny trained fixture, the exemplar pool its prepared synthetic data.

COCOSNET_APP_MODEL / COCOSNET_APP_DATA point the test at another model and prepared folder (the user guide's
screenshot is of the default `dvc repro` model: models/ and data/prepared)."""
from __future__ import annotations

import io
import os
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains

from tests.browser import chromium, screenshot, wait_for_text
from tests.conftest import in_ci
from tests.mlflow_server import free_port, running_server

pytestmark = pytest.mark.e2e
try:
    import gradio  # noqa: F401
except ModuleNotFoundError:
    if in_ci():
        raise  # CI installs the app extra (scripts/bootstrap.sh) and must run these tests
    pytest.skip("the app extra is not installed (pip install -e '.[app]')", allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(request, tmp_path_factory):
    """`cocosnet app` on 127.0.0.1 (the real command line). -> (base URL, model size)."""
    from pipeline.inference import load

    model = os.environ.get("COCOSNET_APP_MODEL") or str(request.getfixturevalue("model_dir"))
    data = (os.environ.get("COCOSNET_APP_DATA")
            or str(request.getfixturevalue("train_shards").parent / "prepared"))  # the fixture's prepare output
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    command = [sys.executable, "-m", "pipeline.cli", "app", "--model", model, "--data", data, "--port", str(port)]
    with running_server(command, f"http://127.0.0.1:{port}/", log, {"GRADIO_ANALYTICS_ENABLED": "False"}):
        yield f"http://127.0.0.1:{port}", tuple(load(model).cfg.image_size)


@pytest.fixture(scope="module")
def browser():
    driver = chromium((1600, 1250))
    yield driver
    driver.quit()


def element(driver, css: str, timeout: float = 60):
    """The first element matching `css` once it is displayed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in driver.find_elements("css selector", css) if e.is_displayed()]
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"no visible {css!r} on the page")


def shown_image(driver, css: str, previous: str | None = None, timeout: float = 120) -> tuple[Image.Image, str]:
    """Download the image an <img> under `css` shows, once its src differs from `previous`. -> (image, src)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        images = driver.find_elements("css selector", f"{css} img")
        src = images[0].get_attribute("src") if images else None
        if src and src != previous and not src.startswith("data:image/svg"):
            with urllib.request.urlopen(src, timeout=30) as response:
                return Image.open(io.BytesIO(response.read())).convert("RGB"), src
        time.sleep(0.3)
    raise AssertionError(f"{css} never showed a new image")


def settled_image(driver, css: str, previous: str | None, quiet: float = 2.0) -> tuple[Image.Image, str]:
    """shown_image once the <img> has shown something new and then kept it for `quiet` seconds (a preview that
    several events update)."""
    image, src = shown_image(driver, css, previous)
    while True:
        time.sleep(quiet)
        latest = driver.find_element("css selector", f"{css} img").get_attribute("src")
        if latest == src:
            return image, src
        image, src = shown_image(driver, css, src)


def stroke(driver, canvas, points: list[tuple[int, int]]) -> None:
    """Drag the mouse through `points` (offsets from the canvas element's centre)."""
    chain = ActionChains(driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        chain = chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def click_image_pixel(driver, image, x: int, y: int) -> None:
    """Click pixel (x, y) of an <img> shown with object-fit: contain (the image is centred in its box)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)  # actions do not scroll
    width, height = image.size["width"], image.size["height"]
    natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    shrink = min(width / natural[0], height / natural[1])
    left, top = (width - natural[0] * shrink) / 2, (height - natural[1] * shrink) / 2
    ActionChains(driver).move_to_element_with_offset(image, round(left + (x + 0.5) * shrink - width / 2),
                                                     round(top + (y + 0.5) * shrink - height / 2)).click().perform()


def test_paint_fill_undo_retrieve_translate_and_edit(browser, app_url):
    base, size = app_url
    browser.get(base)
    wait_for_text(browser, ["Retrieve exemplars like this map", "1 class 1"])
    _, blank_map = shown_image(browser, "#map-view")

    # A few strokes with the brush's default class (class 1); the map preview decodes the canvas.
    canvas = element(browser, "#canvas canvas")
    stroke(browser, canvas, [(-120, -100), (0, -100), (120, -60)])
    stroke(browser, canvas, [(-100, 40), (-100, 140)])
    stroke(browser, canvas, [(20, 60), (140, 120)])
    painted, painted_src = settled_image(browser, "#map-view", previous=blank_map)
    painted_share = (np.asarray(painted) != 0).any(axis=2).mean()
    assert painted_share > 0.02  # strokes over the all-background (black) map

    # Fill: a click on the preview's top-left corner (background) gives that region the fill class; Undo takes it back.
    click_image_pixel(browser, element(browser, "#map-view img"), 2, 2)
    filled, filled_src = shown_image(browser, "#map-view", previous=painted_src)
    assert (np.asarray(filled) != 0).any(axis=2).mean() > max(0.5, painted_share)
    element(browser, "#undo").click()
    undone, _ = shown_image(browser, "#map-view", previous=filled_src)
    assert np.array_equal(np.asarray(undone), np.asarray(painted))

    # Retrieve exemplars for the painted map, pick the nearest, translate.
    element(browser, "#retrieve").click()
    thumbnails = []
    deadline = time.monotonic() + 60
    while len(thumbnails) < 6 and time.monotonic() < deadline:
        thumbnails = [e for e in browser.find_elements("css selector", "#pool img") if e.is_displayed()]
        time.sleep(0.3)
    assert len(thumbnails) == 6
    thumbnails[0].click()
    wait_for_text(browser, ["(dataset)"])
    element(browser, "#translate").click()
    output, _ = shown_image(browser, "#output")
    warped, _ = shown_image(browser, "#warped")
    wait_for_text(browser, [f"Translated {size[0]}x{size[1]} in"])
    assert output.size == warped.size == (size[1], size[0])
    assert np.asarray(output).std() > 1.0  # an image, not a constant
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "app_translate.png")

    # Edit mode: the chosen photo's own map goes onto the canvas.
    _, before = shown_image(browser, "#map-view")
    element(browser, "#edit").click()
    wait_for_text(browser, ["Editing", "the photo stays the exemplar"])
    edited, _ = shown_image(browser, "#map-view", previous=before)
    assert len(np.unique(np.asarray(edited).reshape(-1, 3), axis=0)) >= 2  # a scene's map, several classes


def test_a_non_image_upload_gets_a_message_on_the_page(browser, app_url, tmp_path):
    base, _ = app_url
    browser.get(base)
    wait_for_text(browser, ["Or upload an exemplar photo", "Translate"])
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    upload = browser.find_element("css selector", "input[data-testid='Or upload an exemplar photo-upload-button']")
    upload.send_keys(str(notes))
    body = wait_for_text(browser, ["notes.txt is not a usable exemplar photo"])
    assert "Traceback" not in body
    screenshot(browser, "app_error.png")
