"""`pipeline serve` in a real browser: Debian's headless chromium driven by Selenium and chromium-driver.

Nothing is downloaded at test time: the driver is /usr/bin/chromedriver, passed
explicitly so Selenium Manager never runs. Without chromium, chromedriver or
selenium these tests skip (tests/test_serve.py covers the same pages over HTTP).
Install: ``apt-get install -y chromium chromium-driver`` and the ``test`` extra.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.serve_fixtures import LiveServer, create_app, inputs, png_bytes, served  # noqa: F401

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
if not CHROMEDRIVER.is_file() or CHROMIUM is None:
    pytest.skip("chromium or /usr/bin/chromedriver is absent: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def live(inputs):
    server = LiveServer(create_app(served(inputs)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _wait(browser, condition, timeout: float = 60):
    return WebDriverWait(browser, timeout).until(condition)


def test_upload_on_predict_shows_five_bars(live, browser, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(80, 60))
    browser.get(live.url + "/predict")
    assert browser.find_element(By.CSS_SELECTOR, "#model h1").text == "test_resnet"
    browser.find_element(By.ID, "image").send_keys(str(image))  # the page submits on choosing a file
    _wait(browser, EC.presence_of_element_located((By.ID, "bars")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert len(rows) == 5
    probs = [float(r.find_element(By.CLASS_NAME, "prob").text.rstrip("%")) for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.5
    widths = [r.find_element(By.CSS_SELECTOR, ".bar > span").size["width"] for r in rows]
    track = rows[0].find_element(By.CLASS_NAME, "bar").size["width"]
    for w, p in zip(widths, probs):  # the bars are drawn at the probabilities' lengths
        assert w == pytest.approx(track * p / 100, abs=2)


def test_dropping_an_image_on_the_zone_predicts(live, browser):
    import base64

    browser.get(live.url + "/predict")
    # A real drop event carrying a file, as the browser builds it when a file is dragged onto the zone.
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    """, base64.b64encode(png_bytes(50, 70, seed=3)).decode())
    _wait(browser, EC.presence_of_element_located((By.ID, "bars")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")) == 5
    assert "dropped.png (50x70)" in browser.find_element(By.CSS_SELECTOR, "#result figcaption").text


def test_a_non_image_upload_shows_the_message(live, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(live.url + "/predict")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    error = _wait(browser, EC.presence_of_element_located((By.ID, "error")))
    assert error.text == "notes.png: not an image file (Pillow cannot identify its format)"


def test_cache_gallery_filters_by_class(live, browser):
    browser.get(live.url + "/cache?n=9")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 9
    Select(browser.find_element(By.ID, "class")).select_by_visible_text("cat")  # submits on change
    _wait(browser, EC.url_contains("class=cat"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery .card")
    assert [c.get_attribute("data-label") for c in cards] == ["cat"] * 3
    for card in cards:  # every cached crop is shown, with its top-k
        assert len(card.find_elements(By.CSS_SELECTOR, ".crop img")) == 3
        assert all(img.get_property("naturalWidth") == 32 for img in card.find_elements(By.CSS_SELECTOR, ".crop img"))
        assert len(card.find_elements(By.CSS_SELECTOR, ".topk li")) == 3 * 2


def test_runs_plot_two_runs_with_differing_config_keys(live, browser):
    browser.get(live.url + "/runs")
    plot = browser.find_element(By.CSS_SELECTOR, "#plot svg")
    assert plot.size["width"] > 600
    legend = " ".join(t.get_attribute("textContent") for t in plot.find_elements(By.CSS_SELECTOR, "text"))
    assert "lr_0.1" in legend and "lr_0.01" in legend
    rows = browser.find_elements(By.CSS_SELECTOR, "#differing tr")
    assert [c.text for c in rows[0].find_elements(By.TAG_NAME, "th")] == ["key", "lr_0.01", "lr_0.1"]
    assert [c.text for c in rows[1].find_elements(By.TAG_NAME, "td")] == ["optim.lr", "0.01", "0.1"]
    # unticking one run leaves one curve and no comparison
    browser.find_element(By.CSS_SELECTOR, 'input[value="lr_0.01"]').click()
    browser.find_element(By.CSS_SELECTOR, "#pick button").click()
    _wait(browser, EC.url_contains("run=lr_0.1"))
    assert not browser.find_elements(By.ID, "differing")
    assert re.search(r"lr_0\.1\b", browser.find_element(By.ID, "plot").get_attribute("innerHTML"))
