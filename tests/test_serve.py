"""`pipeline serve` over plain HTTP: every page and error path (tiny random-init models, generated images).

Runs in CI without a browser: Flask's test client for the pages, the real threaded
server on a free 127.0.0.1 port for what must not be readable through it, and the
command itself in a subprocess. tests/test_serve_browser.py drives the same pages
in headless chromium.
"""
from __future__ import annotations

import base64
import html as html_lib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.serve_fixtures import NAMES, PRE, LiveServer, create_app, inputs, png_bytes, served, write_run  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client(inputs):
    return create_app(served(inputs)).test_client()


def _upload(client, data: bytes, name: str = "photo.png"):
    return client.post("/predict", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def _error(html: str) -> str:
    found = re.search(r'id="error">(.*?)</p>', html, flags=re.S)
    assert found, "the page shows no error message"
    return html_lib.unescape(" ".join(found.group(1).split()))


def _bars(html: str) -> list[tuple[str, float]]:
    names = re.findall(r'<span class="name">([^<]*)</span>', html)
    probs = [float(p) for p in re.findall(r'<span class="prob">([\d.]+)%</span>', html)]
    return list(zip(names, probs))


def _data_uri_pixels(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


# ----------------------------------------------------------------------------------------------- Predict

def test_predict_page_names_the_model_and_its_preprocessing(client, inputs):
    html = client.get("/predict").text
    assert "<h1>test_resnet</h1>" in html and str(inputs["ckpt"]) in html
    assert "7 classes" in html and "32 px, bilinear, centre crop 0.875" in html


def test_upload_shows_the_top5_of_the_models_own_preprocessing(client, inputs):
    # A uniform image: every crop and resize of it is that colour, so the expected input is known exactly.
    colour = (200, 30, 90)
    buf = io.BytesIO()
    Image.new("RGB", (90, 60), colour).save(buf, "PNG")
    response = _upload(client, buf.getvalue())
    assert response.status_code == 200
    pixel = (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(PRE["mean"])) / torch.tensor(PRE["std"])
    with torch.no_grad():
        probs = inputs["model"](pixel.view(1, 3, 1, 1).expand(1, 3, 32, 32)).softmax(-1)[0]
    top = probs.topk(5)
    expected = [(NAMES[i], round(100 * float(p), 1)) for p, i in zip(top.values, top.indices)]
    assert _bars(response.text) == expected
    # the bar widths are the probabilities too
    widths = [float(w) for w in re.findall(r'style="width: ([\d.]+)%"', response.text)]
    assert widths == pytest.approx([100 * float(p) for p in top.values], abs=0.01)
    assert "photo.png (90x60) as the model sees it" in response.text


def test_a_non_image_upload_is_a_message_and_the_server_keeps_serving(client):
    response = _upload(client, b"%PDF-1.4 not a picture", "report.pdf")
    assert response.status_code == 400
    assert _error(response.text) == "report.pdf: not an image file (Pillow cannot identify its format)"
    assert _upload(client, b"", "empty.png").status_code == 400
    no_field = client.post("/predict", data={}, content_type="multipart/form-data")
    assert no_field.status_code == 400 and "form field 'image'" in _error(no_field.text)
    assert len(_bars(_upload(client, png_bytes(40, 30)).text)) == 5  # still serving


def test_a_truncated_image_is_a_message(client):
    data = png_bytes(64, 64)
    response = _upload(client, data[: len(data) // 2], "cut.png")
    message = _error(response.text)
    assert response.status_code == 400 and message.startswith("cut.png: ") and "truncated" in message


def test_a_released_model_by_hub_name_with_local_weights(inputs, tmp_path):
    import timm

    weights = tmp_path / "MEALV2_MobileNet_V3_Small_0.75_224.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("tf_mobilenetv3_small_075", num_classes=1000).state_dict(), weights)
    client = create_app(served(inputs, checkpoint=None, hub="mealv2_mobilenetv3_small_075", hub_weights=weights,
                               cache=None, manifest=None, runs=[])).test_client()
    html = client.get("/predict").text
    assert "<h1>tf_mobilenetv3_small_075</h1>" in html and "meal_v2:mealv2_mobilenetv3_small_075" in html
    assert "1000 classes" in html and "224 px, bilinear, centre crop 0.875" in html  # MEAL V2's, not timm's
    bars = _bars(_upload(client, png_bytes(120, 90)).text)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    imagenet = {info.index_to_description(i) for i in range(1000)}
    assert len(bars) == 5 and all(html_lib.unescape(name) in imagenet for name, _ in bars)


def test_too_many_pixels_is_refused_from_the_header(inputs):
    app = create_app(served(inputs, cache=None, manifest=None, runs=[], max_pixels=100 * 100))
    client = app.test_client()
    response = _upload(client, png_bytes(101, 100), "big.png")
    assert response.status_code == 400
    assert _error(response.text) == ("big.png: 101x100 pixels is more than this server accepts (10,000 pixels, "
                                     "--max-pixels); send a smaller image")
    assert _upload(client, png_bytes(100, 100)).status_code == 200


def test_an_upload_over_the_size_limit_is_refused(inputs):
    client = create_app(served(inputs, cache=None, manifest=None, runs=[]), max_upload_bytes=2000).test_client()
    response = _upload(client, png_bytes(200, 200))  # ~120 KB of noise
    assert response.status_code == 413
    assert _error(response.text) == ("the upload is larger than this server accepts (2,000 bytes, --max-upload-mb); "
                                     "send a smaller image")


def test_the_real_server_answers_an_oversized_upload_with_the_message(inputs):
    """Werkzeug's server, not the test client: the 413 page arrives (no connection reset) and serving goes on."""
    live = LiveServer(create_app(served(inputs, cache=None, manifest=None, runs=[]), max_upload_bytes=1 << 20))
    try:
        boundary = "x" * 20
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + png_bytes(1200, 1000) + f"\r\n--{boundary}--\r\n".encode()
        host, port = live.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/predict", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        assert response.status == 413 and "larger than this server accepts (1 MB" in _error(response.read().decode())
        conn.close()
        assert _raw_get(live.url, "/predict")[0] == 200
    finally:
        live.close()


# ----------------------------------------------------------------------------------------------- Cache

def test_cache_page_shows_the_metadata(client, inputs):
    html = client.get("/cache").text
    facts = re.search(r'<table class="facts".*?</table>', html, flags=re.S).group(0)
    text = " ".join(re.sub(r"<[^>]+>", " ", facts).split())
    assert "test_resnet (test_resnet" in text and "test_efficientnet (test_efficientnet" in text
    assert "accuracy not measured" in text  # the fixture cache was built without --evaluate-teachers
    assert "3 per image" in text and "flip p 0.5" in text and "seed 0" in text
    assert "top-2 classes per crop" in text
    assert "3/3 shards complete" in text
    size = sum(f.stat().st_size for f in inputs["cache"].rglob("*") if f.is_file())
    assert f"bytes per crop {size / (9 * 3):.1f}" in text


def test_cache_page_shows_the_ensemble_check(inputs, tmp_path):
    """A cache built with --evaluate-teachers: each teacher's leave-one-out figure and the warning."""
    import zarr

    from stage1_teacher_cache.teacher_eval import summarize_hits

    cache = tmp_path / "cache"
    shutil.copytree(inputs["cache"], cache)
    # 10 images: test_resnet 8 right, test_efficientnet 3, their mean 6; without one, the other alone
    record = summarize_hits(["test_resnet", "test_efficientnet"], [[8, 10], [3, 9], [6, 10], [3, 9], [8, 10]],
                            10, 3, {"hash": "h", "path": "val.parquet", "num_images": 10})
    zarr.open_group(str(cache), mode="r+").attrs.update({"teacher_eval": record})
    html = create_app(served(inputs, cache=cache)).test_client().get("/cache").text
    facts = re.search(r'<table class="facts".*?</table>', html, flags=re.S).group(0)
    text = " ".join(re.sub(r"<[^>]+>", " ", facts).split())
    assert "val top-1 80.00%, top-5 100.00%; ensemble without it top-1 30.00%" in text
    assert "val top-1 30.00%, top-5 90.00%; ensemble without it top-1 80.00%" in text
    assert "val top-1 60.00%, top-5 100.00%; best single teacher test_resnet 80.00%" in text
    assert "teacher test_efficientnet lowers the ensemble: without it 80.00%, with it 60.00% top-1" in text
    assert 'id="ensemble-warnings"' in facts


def _cards(html: str) -> list[str]:
    return re.findall(r'<article class="card".*?</article>', html, flags=re.S)


def test_gallery_draws_every_crop_as_the_student_sees_it_with_its_topk(client, inputs):
    html = client.get("/cache?n=9").text
    cards = _cards(html)
    assert len(cards) == 9  # every image of the tiny cache, in id order
    reader, manifest_dir = inputs["reader"], inputs["manifest"].parent / "train-images"
    rows = reader.images(np.arange(9))
    for image_id, card in enumerate(cards):
        assert f"#{image_id} " in card
        uris = re.findall(r'<img src="(data:[^"]+)" alt="crop \d+"', card)
        assert len(uris) == 3
        path = manifest_dir / re.search(r'class="path">([^<]+)<', card).group(1)
        original = Image.open(path).convert("RGB")
        for c, uri in enumerate(uris):
            x, y, w, h = (int(v) for v in rows["boxes"][image_id, c])
            expected = original.crop((x, y, x + w, y + h)).resize((32, 32), Image.Resampling.BILINEAR)
            if rows["flip"][image_id, c]:
                expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            got = _data_uri_pixels(uri).astype(np.int16)
            assert got.shape == (32, 32, 3)
            # torch's antialiased bilinear and PIL's agree within a few levels on average
            assert np.abs(got - np.asarray(expected, np.int16)).mean() < 6
        shown = [[(n, float(p)) for n, p in re.findall(r"<li>(\w+) <b>([\d.]+)%</b></li>", block)]
                 for block in re.findall(r'<ol class="topk">(.*?)</ol>', card, flags=re.S)]
        for c in range(3):
            expected = [("ant bee cat".split()[int(j)], round(100 * float(p), 1))
                        for j, p in zip(rows["topk_index"][image_id, c], rows["topk_prob"][image_id, c])]
            assert shown[c] == expected


def test_gallery_filters_by_class(client, inputs):
    html = client.get("/cache?class=bee&n=48").text
    labels = re.findall(r'<span class="label">([^<]+)</span>', html)
    assert labels == ["bee"] * 3  # the fixture deals 9 images round-robin over ant, bee, cat
    assert '<option value="bee" selected>' in html
    unknown = client.get("/cache?class=wasp")
    assert unknown.status_code == 400 and "unknown class 'wasp'" in _error(unknown.text)
    assert client.get("/cache?n=many").status_code == 400


def test_gallery_filter_shows_only_crops_where_the_ensemble_disagrees_with_the_label(client, inputs):
    rows = inputs["reader"].images(np.arange(9))
    labels = pq.read_table(inputs["manifest"], columns=["label"]).column("label").to_pylist()
    # the expected crops, from the stored arrays: the most probable stored class is not the label
    expected = {i: [c + 1 for c in range(3)
                    if rows["topk_index"][i, c, int(np.argmax(rows["topk_prob"][i, c]))] != labels[i]]
                for i in range(9)}
    html = client.get("/cache?n=48&disagree=1").text
    cards = _cards(html)
    shown = {int(re.search(r"#(\d+) ", card).group(1)): [int(n) for n in re.findall(r'alt="crop (\d+)"', card)]
             for card in cards}
    assert shown == {i: crops for i, crops in expected.items() if crops}
    assert 0 < len(shown) < 9  # the fixture's random teachers agree on some images: the filter drops them
    assert 'name="disagree" id="disagree" value="1" checked' in html
    assert all(card.count('class="crop disagrees"') == len(shown[i]) for i, card in zip(sorted(shown), cards))
    agreement = re.search(r'<td id="agreement">(.*?)</td>', client.get("/cache").text, flags=re.S).group(1)
    assert "ensemble top-1" in agreement and "% of crops" in agreement


def test_a_cache_for_another_manifest_is_shown_with_the_message_and_not_served(inputs):
    client = create_app(served(inputs, manifest=inputs["other"])).test_client()
    response = client.get("/cache")
    assert response.status_code == 409
    assert "fails verification; it is not served" in response.text
    assert "but the given manifest is" in response.text
    assert "<article" not in response.text and "facts" not in response.text
    assert client.get("/runs").status_code == 200  # the other pages are unaffected


def test_a_missing_manifest_is_shown_on_the_cache_page(inputs, tmp_path):
    client = create_app(served(inputs, manifest=tmp_path / "gone.parquet")).test_client()
    response = client.get("/cache")
    assert response.status_code == 409 and "gone.parquet" in response.text and "<article" not in response.text


def test_a_damaged_cache_lists_the_verify_problems(inputs, tmp_path):
    damaged = tmp_path / "cache"
    shutil.copytree(inputs["cache"], damaged)
    chunk = next(p for p in sorted((damaged / "topk_prob").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[::-1])
    client = create_app(served(inputs, cache=damaged)).test_client()
    response = client.get("/cache")
    assert response.status_code == 409 and "array topk_prob" in response.text and "<article" not in response.text


# ----------------------------------------------------------------------------------------------- Runs

def test_runs_plot_both_runs_and_list_the_keys_that_differ(client):
    response = client.get("/runs")
    assert response.status_code == 200
    svg = re.search(r'<div class="plot" id="plot">(<svg.*?</svg>)</div>', response.text, flags=re.S).group(1)
    assert "lr_0.1" in svg and "lr_0.01" in svg and "validation top-1" in svg and "validation loss" in svg
    table = re.search(r'<table class="grid" id="differing">.*?</table>', response.text, flags=re.S).group(0)
    keys = re.findall(r"<td><code>([^<]+)</code></td>", table)
    assert keys == ["optim.lr"]  # distill.out differs too but is where each run writes, not a choice
    assert "<td>0.01</td><td>0.1</td>" in table  # columns in run order: lr_0.01, lr_0.1
    summary = response.text.split('id="summary"', 1)[1]
    assert "<td>lr_0.1</td><td>3</td>\n      <td>50.00</td><td>1.2000</td>" in summary


def test_runs_selection_and_unknown_names(client, inputs):
    one = client.get("/runs?run=lr_0.1").text
    assert 'value="lr_0.1" checked' in one and 'value="lr_0.01" >' in one and 'id="differing"' not in one
    for name in ("../secret.txt", str(inputs["tmp"] / "secret.txt"), "lr_0.1/../../secret.txt"):
        response = client.get("/runs", query_string={"run": name})
        assert response.status_code == 400 and "unknown run(s)" in response.text
        assert "not for the web" not in response.text


def test_a_run_with_a_malformed_metrics_file_is_named(inputs, tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "good", 0.1, [10.0], [2.0])
    bad = write_run(runs / "bad", 0.2, [10.0], [2.0])
    (bad / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 1')
    client = create_app(served(inputs, cache=None, manifest=None, runs=[runs])).test_client()
    html = client.get("/runs").text
    assert f"{bad}: cannot read metrics.jsonl/config.json" in html and 'id="plot"' in html


def test_a_run_directory_itself_can_be_given(inputs):
    client = create_app(served(inputs, checkpoint=None, cache=None, manifest=None,
                               runs=[inputs["runs"] / "lr_0.1"])).test_client()
    assert client.get("/").headers["Location"].endswith("/runs")
    assert 'value="lr_0.1" checked' in client.get("/runs").text
    assert client.get("/predict").status_code == 200 and "No model loaded" in client.get("/predict").text
    assert client.post("/predict").status_code == 404
    assert client.get("/cache").status_code == 404


# ----------------------------------------------------------------------------------------------- Confinement

def _raw_get(url: str, target: str, follow: bool = True) -> tuple[int, bytes]:
    """A request line sent as written (no client-side normalisation of dot segments); follows one redirect."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("GET", target, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    status, body, location = response.status, response.read(), response.getheader("Location")
    conn.close()
    if follow and status in (301, 302, 307, 308):  # werkzeug merges "//" into "/" by redirecting
        return _raw_get(url, location.removeprefix(url), follow=False)
    return status, body


def test_nothing_outside_the_served_directories_is_readable(inputs, tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "mine", 0.1, [10.0], [2.0])
    outside = write_run(tmp_path / "elsewhere" / "theirs", 0.3, [99.0], [0.1])
    (outside / "secret.txt").write_text("not for the web")
    os.symlink(outside, runs / "linked")  # a run reached through a symlink would leave the served folder
    live = LiveServer(create_app(served(inputs, runs=[runs])))
    try:
        assert _raw_get(live.url, "/static/style.css")[0] == 200
        for target in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                       "/static/..%2f..%2f..%2fetc%2fpasswd", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
                       f"/static/{tmp_path}/elsewhere/theirs/secret.txt", "/../../etc/passwd",
                       "/runs?run=../elsewhere/theirs", "/runs?run=linked", f"/runs?run={outside}",
                       "/cache?class=../../etc/passwd", "/static/../serve_fixtures.py", "/static/../app.py"):
            status, body = _raw_get(live.url, target)
            assert b"root:" not in body and b"not for the web" not in body, target
            assert b"def create_app" not in body and b"99.0" not in body, target
            assert status in (400, 404), (target, status)
        status, body = _raw_get(live.url, "/runs")
        assert status == 200 and b"mine" in body and b"linked" not in body
    finally:
        live.close()


def test_pages_fetch_nothing_from_another_host(client):
    """What a browser would fetch: src/href attributes, CSS url()/@import, JS fetch/XHR; only same-server paths."""
    package = ROOT / "stage2_student_distill" / "app" / "serve"
    shipped = [p.read_text() for p in sorted((package / "templates").iterdir()) + sorted((package / "static").iterdir())]
    pages = [client.get(url).text for url in ("/predict", "/cache", "/runs")]
    for text in shipped + pages:
        targets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
        targets += re.findall(r"""url\(\s*["']?([^"')]*)""", text) + re.findall(r"""@import\s+["']([^"']*)""", text)
        assert not re.search(r"\b(fetch|XMLHttpRequest|import)\s*\(", text)
        for target in targets:
            assert target.startswith(("/", "#", "data:", "{{")), target


# ----------------------------------------------------------------------------------------------- The command

def test_serve_command_checks_its_arguments(inputs):
    from stage2_student_distill.app.serve.cli import _is_local, serve_command

    runner = CliRunner()
    nothing = runner.invoke(serve_command, [])
    assert nothing.exit_code == 2 and "nothing to serve" in nothing.output
    half = runner.invoke(serve_command, ["--cache", str(inputs["cache"])])
    assert half.exit_code == 2 and "--cache CACHE and --manifest M together" in half.output
    both = runner.invoke(serve_command, ["--checkpoint", str(inputs["ckpt"]), "--hub", "mealv2_resnest50"])
    assert both.exit_code == 2
    missing = runner.invoke(serve_command, ["--checkpoint", str(inputs["tmp"] / "none.pt")])
    assert missing.exit_code == 1 and "none.pt" in missing.output and "Traceback" not in missing.output
    no_gpu = runner.invoke(serve_command, ["--runs", str(inputs["runs"]), "--device", "cuda:7"])
    if not torch.cuda.is_available():
        assert no_gpu.exit_code == 1 and "Traceback" not in no_gpu.output and "cuda" in no_gpu.output.lower()
    assert {p.name: p.default for p in serve_command.params}["host"] == "127.0.0.1"
    assert _is_local("127.0.0.1") and _is_local("::1") and _is_local("localhost") and not _is_local("0.0.0.0")


def test_pipeline_serve_answers_on_localhost(inputs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stage2_student_distill.app.cli", "serve", "--runs", str(inputs["runs"]), "--port", "0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        for line in proc.stderr:
            if line.startswith("serving on"):
                break
        found = re.match(r"serving on (http://127\.0\.0\.1:\d+)/", line)
        assert found, line
        status, body = _raw_get(found.group(1), "/runs")
        assert status == 200 and b"lr_0.01" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_runs_compare_only_the_tables_each_runs_command_reads(inputs, tmp_path):
    """A train run's config.json holds [distill]'s defaults and a distill run [train]'s: neither is compared."""
    runs = tmp_path / "runs"
    distill = write_run(runs / "distilled", 0.1, [10.0], [2.0], student="resnet50")
    trained = runs / "trained"
    trained.mkdir()
    (trained / "config.json").write_text(json.dumps({
        "optim": {"lr": 0.1, "epochs": 1, "batch_size": 8}, "runtime": {"device": "cpu"},
        "train": {"model": "resnet50", "out": str(trained)}, "distill": {"student": "resnet50", "out": ""},
        "crops": {"num_crops": 1}}))
    (trained / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1": 12.0, "val_loss": 1.9}) + "\n")
    cfg = json.loads((distill / "config.json").read_text())
    cfg["train"] = {"model": "resnet50", "out": ""}
    (distill / "config.json").write_text(json.dumps(cfg))
    html = create_app(served(inputs, cache=None, manifest=None, runs=[runs])).test_client().get("/runs").text
    table = re.search(r'<table class="grid" id="differing">.*?</table>', html, flags=re.S).group(0)
    keys = re.findall(r"<td><code>([^<]+)</code></td>", table)
    # each run's own model key shows (the other run lacks it); the other command's defaults do not
    assert keys == ["crops.num_crops", "distill.student", "train.model"]
    assert "<td>resnet50</td><td>—</td>" in table and "<td>—</td><td>resnet50</td>" in table
