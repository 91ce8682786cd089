"""Regenerate docs/img/serve_{predict,cache,runs}.png from a `pipeline demo` output folder.

    pipeline --set demo.out=/tmp/d/run --set demo.data_dir=/tmp/d/data ... demo   # any demo settings
    python docs/img/serve_screenshots.py /tmp/d/run /tmp/d/data

Needs Flask, selenium, Debian's chromium and chromium-driver (as tests/test_serve_browser.py).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from stage2_student_distill.app.serve.app import Served, create_app, make_server
from stage1_teacher_cache.info import cache_info

HERE = Path(__file__).resolve().parent


def main(run: Path, data: Path) -> None:
    student = run / "student_mealv2"
    served = Served(checkpoint=student / "best.pt", cache=str(run / "cache"),
                    manifest=cache_info(str(run / "cache"))["manifest"]["path"], runs=[run])
    served.cache.wait()
    server = make_server(create_app(served), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        test_image = sorted(next(data.glob("test-*")).rglob("*.png"))[7]
        driver.set_window_size(1200, 620)
        driver.get(url + "/predict")
        driver.find_element(By.ID, "image").send_keys(str(test_image))
        time.sleep(2)
        driver.save_screenshot(str(HERE / "serve_predict.png"))
        driver.set_window_size(1200, 1250)
        driver.get(url + "/cache?n=6&seed=3")
        driver.save_screenshot(str(HERE / "serve_cache.png"))
        driver.set_window_size(1200, 1120)
        driver.get(url + "/runs?run=student_mealv2&run=student_hard")
        driver.save_screenshot(str(HERE / "serve_runs.png"))
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
