"""`pipeline serve`: local web pages to look at a model's predictions, a teacher cache and runs
(one module a page: ``predict_view``, ``cache_view``, ``runs_view``; ``app.py`` routes them).

Flask is an optional dependency (the ``serve`` extra); only ``cli.py`` is imported
without it, to say so.
"""

# Upload limits (the ``--max-upload-mb`` / ``--max-pixels`` defaults): one photo, refused before its body
# is read; a decoded size checked from the header, so a small file that would decode huge is never decoded.
MAX_UPLOAD_MB = 32
MAX_PIXELS = 50_000_000
# Predictions run at once (``--max-predictions``); one more is answered 503 at once rather than queued, so the
# memory of a busy server stays near this many decoded images of at most MAX_PIXELS each.
MAX_PREDICTIONS = 2
