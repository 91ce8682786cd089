"""`pipeline serve`: local web pages to look at a model's predictions, a teacher cache and runs.

* ``app.py``        the Flask application: routes, upload limits, error pages
* ``predict_view``  an uploaded image through ``stage2_student_distill.predict``
* ``cache_view``    ``cache info`` metadata, ``cache verify``, a gallery of cached crops
* ``runs_view``     validation curves of run directories and the config keys that differ
* ``cli.py``        the ``pipeline serve`` command

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
