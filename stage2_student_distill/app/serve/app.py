"""The Flask application behind ``pipeline serve``.

Three pages, each enabled by its command-line input: Predict (``--checkpoint``
or ``--hub``), Cache (``--cache`` with ``--manifest``) and Runs (``--runs``).
Bad input (an upload that is not an image, too large, a cache that does not
verify) is a message on the page with a 4xx status; the server keeps running.

What a request can read: the pages, the package's own ``static/`` files
(Flask's ``send_from_directory`` refuses paths that leave it), manifest images
by integer id through ``ConfinedPaths``, and the files of runs found under
``--runs`` by name lookup. No request parameter is ever joined to a path.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from flask import Flask, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.config import SEED_RANGE
from stage2_student_distill.app.serve import MAX_PIXELS, MAX_PREDICTIONS, MAX_UPLOAD_MB, runs_view
from stage2_student_distill.app.serve.cache_view import MAX_GALLERY, CacheView
from stage2_student_distill.app.serve.predict_view import UploadError, describe_model, predict_upload
from stage2_student_distill.predict import class_names, load_model

GALLERY_DEFAULT = 12
RETRY_AFTER_S = 2  # what a busy Predict page tells the client to wait: about one CPU prediction


class QueryError(ValueError):
    """A query parameter out of its range; the message is shown on the page with a 400."""


def int_arg(name: str, shown: str, default: int, lo: int, hi: int) -> int:
    """The integer query parameter ``name`` (labelled ``shown`` on the page) in lo..hi, else QueryError."""
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{shown} must be an integer, not {text[:40]!r}") from None
    if not lo <= value <= hi:
        raise QueryError(f"{shown} must be from {lo} to {hi:,}, not {text[:40]}")
    return value


class Served:
    """What this server was started with; built once, read by every request (thread-safe: read-only)."""

    def __init__(self, checkpoint=None, hub=None, hub_weights=None, cache=None, manifest=None,
                 runs: Sequence[str | os.PathLike] = (), device: str | torch.device = "cpu",
                 max_pixels: int = MAX_PIXELS, max_predictions: int = MAX_PREDICTIONS):
        self.loaded, self.model, self.names = None, None, []
        if checkpoint is not None or hub is not None:
            self.loaded = load_model(checkpoint, hub, hub_weights, device)
            self.names = class_names(self.loaded)
            self.model = describe_model(self.loaded, self.names)
        self.cache = None
        if cache is not None:
            student = self.loaded.preprocess if self.loaded is not None else None
            whose = f"the student {self.model['name']} ({self.model['source']})" if self.loaded else ""
            self.cache = CacheView(str(cache), str(manifest), student, whose)
        self.runs = [Path(r) for r in runs]
        self.max_pixels = max_pixels
        self.predicting = threading.BoundedSemaphore(max_predictions)  # held while one upload is predicted


def create_app(served: Served, max_upload_bytes: int = MAX_UPLOAD_MB << 20) -> Flask:
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=max_upload_bytes, TEMPLATES_AUTO_RELOAD=False)
    app.extensions["pipeline_serve"] = served

    nav = {"predict": served.loaded is not None, "cache": served.cache is not None, "runs": bool(served.runs)}

    def page(template: str, status: int = 200, **context: Any):
        return render_template(template, nav=nav, active=template.split(".")[0], **context), status

    @app.get("/")
    def index():
        first = next((name for name, on in nav.items() if on), None)  # the first page this server has
        return redirect(url_for(first)) if first else page("predict.html", model=None)

    @app.get("/predict")
    def predict():
        return page("predict.html", model=served.model)

    @app.post("/predict")
    def predict_post():
        if served.loaded is None:
            return page("predict.html", 404, model=None)
        # Taken before the body is parsed: a busy server neither buffers nor decodes another upload.
        if not served.predicting.acquire(blocking=False):
            html, status = page("predict.html", 503, model=served.model,
                                error=f"the server is busy with other predictions; try again in {RETRY_AFTER_S} s")
            return html, status, {"Retry-After": str(RETRY_AFTER_S)}
        try:
            upload = request.files.get("image")
            if upload is None:
                raise UploadError("no image received: choose or drop an image file (form field 'image')")
            result = predict_upload(served.loaded, served.names, upload.read(), upload.filename or "",
                                    served.max_pixels)
        except UploadError as e:
            return page("predict.html", 400, model=served.model, error=str(e))
        finally:
            served.predicting.release()
        return page("predict.html", model=served.model, result=result)

    @app.get("/cache")
    def cache():
        view = served.cache
        if view is None or not view.ok:
            status = 404 if view is None else (503 if view.verifying else 409)
            return page("cache.html", status, view=view)
        chosen, error = request.args.get("class") or None, None
        try:
            n = int_arg("n", "images", GALLERY_DEFAULT, 1, MAX_GALLERY)
            seed = int_arg("seed", "sample", 0, *SEED_RANGE)
        except QueryError as e:
            n, seed, error = GALLERY_DEFAULT, 0, str(e)
        disagree = request.args.get("disagree") == "1"
        ids, sample_error = view.sample(chosen, n, seed, disagree)
        error = error or sample_error
        return page("cache.html", 400 if error else 200, view=view, summary=view.summary(),
                    classes=view.class_names, chosen=chosen, n=n, seed=seed, max_n=MAX_GALLERY, disagree=disagree,
                    cards=[] if error else [view.card(i, disagree) for i in ids], error=error,
                    student=view.student_view())

    @app.get("/runs")
    def runs():
        if not served.runs:
            return page("runs.html", 404, data=None)
        try:
            data = runs_view.runs_page(served.runs, request.args.getlist("run"))
        except OSError as e:  # a --runs directory removed while serving
            return page("runs.html", 500, data=None, error=str(e))
        return page("runs.html", 400 if data["unknown"] else 200, data=data)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        limit = f"{max_upload_bytes >> 20} MB" if max_upload_bytes >= 1 << 20 else f"{max_upload_bytes:,} bytes"
        msg = f"the upload is larger than this server accepts ({limit}, --max-upload-mb); send a smaller image"
        return page("predict.html", 413, model=served.model, error=msg)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return page("error.html", e.code or 500, error=f"{e.code} {e.name}: {e.description}")

    @app.errorhandler(Exception)
    def unexpected(e: Exception):  # the request fails, the server stays up, the page says why
        app.logger.exception("request failed")
        return page("error.html", 500, error=f"internal error ({type(e).__name__}: {e})")

    return app


def make_server(app: Flask, host: str = "127.0.0.1", port: int = 8000):
    """A threaded WSGI server (``port=0``: a free one, read back from ``server.server_port``)."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True)
