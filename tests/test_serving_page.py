"""The service's web page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
upload an image, type an instruction, edit, and see the library's edit with the seed and scales the page shows.

Set IP2P_PAGE_SCREENSHOT=docs/images/serving-page.png to keep the screenshot (how the one in docs/ was made).
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import EditPipeline
from engine.serving.jobs import Settings
from tests.serving_server import BUNDLE_LOAD, local_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
INSTRUCTION = "make the circle blue"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs a Chromium and its driver: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser):
    with local_server(Settings(max_batch=4, batch_wait_ms=5)) as (url, _):
        browser.get(url + "/")
        yield browser


def edit_on_page(driver, **fields) -> tuple[np.ndarray, str]:
    """Fill the form, press Edit, wait for the result; (its pixels, the caption naming what was used)."""
    driver.find_element(By.ID, "image").send_keys(str(EXAMPLE))
    for element_id, value in fields.items():
        element = driver.find_element(By.ID, element_id)
        if element.get_attribute("type") == "checkbox":
            if element.is_selected() != value:
                element.click()
        else:
            element.clear()
            element.send_keys(str(value))
    old = driver.find_element(By.ID, "result").get_attribute("src")
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("src") not in (old, None, "")
        or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "error" not in driver.find_element(By.ID, "status").get_attribute("class"), \
        driver.find_element(By.ID, "status").text
    src = driver.find_element(By.ID, "result").get_attribute("src")
    data = base64.b64decode(src.partition(",")[2])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), driver.find_element(By.ID, "used").text


@pytest.fixture(scope="module")
def library():
    return EditPipeline.from_pretrained(**BUNDLE_LOAD, progress=False)


def test_the_page_edits_an_uploaded_image_and_shows_what_it_used(page, library, tmp_path):
    shown, used = edit_on_page(page, prompt=INSTRUCTION, steps=8, seed=1234, text=6.5, imagecfg=1.25)
    assert used == "Edited: seed 1234, text guidance 6.5, image guidance 1.25, 8 steps"
    expected = library.edit(Image.open(EXAMPLE), INSTRUCTION, seed=1234, steps=8, text_guidance=6.5,
                            image_guidance=1.25).images[0]
    np.testing.assert_array_equal(shown, np.asarray(expected))
    assert page.find_element(By.ID, "input-preview").get_attribute("src").startswith("blob:")
    assert page.find_element(By.ID, "status").text.startswith("done in ")
    screenshot = Path(os.environ.get("IP2P_PAGE_SCREENSHOT") or tmp_path / "page.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 500


def test_randomize_draws_a_seed_and_scales_and_shows_them(page, library):
    shown, used = edit_on_page(page, prompt=INSTRUCTION, steps=6, **{"random-seed": True, "random-cfg": True})
    match = re.fullmatch(r"Edited: seed (\d+), text guidance ([\d.]+), image guidance ([\d.]+), 6 steps", used)
    assert match, used
    seed, text, image = int(match[1]), float(match[2]), float(match[3])
    assert 6 <= text <= 9 and 1.2 <= image <= 1.8  # the original demo's ranges
    expected = library.edit(Image.open(EXAMPLE), INSTRUCTION, seed=seed, steps=6, text_guidance=text,
                            image_guidance=image).images[0]
    np.testing.assert_array_equal(shown, np.asarray(expected))


def test_keep_detail_answers_at_the_uploads_size(page, library):
    shown, _ = edit_on_page(page, prompt=INSTRUCTION, steps=4, seed=77, text=7.5, imagecfg=1.5,
                            **{"keep-detail": True, "random-seed": False, "random-cfg": False})
    expected = library.edit(Image.open(EXAMPLE), INSTRUCTION, seed=77, steps=4, keep_detail=True).images[0]
    assert shown.shape[1::-1] == Image.open(EXAMPLE).size
    np.testing.assert_array_equal(shown, np.asarray(expected))
    page.find_element(By.ID, "keep-detail").click()  # off again for the tests after this one


def test_an_error_is_shown_on_the_page(page):
    page.find_element(By.ID, "image").send_keys(str(EXAMPLE))
    steps = page.find_element(By.ID, "steps")
    steps.clear()
    page.execute_script("arguments[0].removeAttribute('max')", steps)  # past the form's own check: the server's
    steps.send_keys("500")
    page.find_element(By.ID, "go").click()
    WebDriverWait(page, 60).until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert page.find_element(By.ID, "status").text == "422: steps: at most 100 on this server, got 500"


def test_empty_fields_edit_at_the_served_models_own_defaults(page):
    """On the shipped distilled model's server, the page's empty steps and scales are that model's (one lcm step
    at its own scales), not the teacher's 20 steps."""
    load = dict(model=str(EXAMPLE.parents[1] / "engine" / "models" / "shapes-distilled-onnx"), backend="onnxruntime")
    student = EditPipeline.from_pretrained(**load, progress=False)
    text, image = student.model.student.scales
    home = page.current_url
    try:
        with local_server(Settings(max_batch=4, batch_wait_ms=5), load) as (url, _):
            page.get(url + "/")
            shown, used = edit_on_page(page, prompt=INSTRUCTION, seed=9)
    finally:
        page.get(home)
    assert used == f"Edited: seed 9, text guidance {text:g}, image guidance {image:g}, 1 step"
    np.testing.assert_array_equal(shown, np.asarray(student.edit(Image.open(EXAMPLE), INSTRUCTION, seed=9).images[0]))
