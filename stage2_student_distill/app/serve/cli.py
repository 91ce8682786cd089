"""`pipeline serve`: a thin shell over ``stage2_student_distill.app.serve.app`` (Flask is imported only when it runs)."""
from __future__ import annotations

import ipaddress

import click

from common.cli_support import config_options, resolve_config, user_errors
from stage2_student_distill.app.serve import MAX_PIXELS, MAX_PREDICTIONS, MAX_UPLOAD_MB

def _is_local(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Predict with this checkpoint (RUN/best.pt) or export.")
@click.option("--hub", "hub_name", metavar="NAME", help="Predict with a released MEAL V2 model (see `pipeline predict --help`).")
@click.option("--hub-weights", metavar="PATH|URL", help="Weights for --hub (default: the torch hub cache or release URL).")
@click.option("--cache", metavar="CACHE", help="Show this teacher cache (directory or fsspec URL); needs --manifest.")
@click.option("--manifest", type=click.Path(dir_okay=False), help="The manifest CACHE was built from.")
@click.option("--runs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A run directory, or a folder of them, to compare on the Runs page (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the pages (and the data they show) to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@config_options({"--device": ("runtime.device", dict(help="Where the Predict model runs: auto | cpu | cuda | cuda:N."))})
@click.option("--max-upload-mb", default=MAX_UPLOAD_MB, show_default=True, type=click.IntRange(1), help="Largest upload accepted.")
@click.option("--max-pixels", default=MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Largest decoded image accepted (width x height).")
@click.option("--max-predictions", default=MAX_PREDICTIONS, show_default=True, type=click.IntRange(1),
              help="Uploads predicted at once; another one is answered 503 (busy, Retry-After) instead of queued.")
@click.pass_context
def serve_command(ctx, checkpoint, hub_name, hub_weights, cache, manifest, runs, host, port, runtime__device,
                  max_upload_mb, max_pixels, max_predictions) -> None:
    """Web pages on HOST:PORT: Predict (--checkpoint/--hub), Cache (--cache with --manifest), Runs (--runs).

    Nothing is fetched from outside at run time; the pages read only the files given here.
    """
    if checkpoint is not None and hub_name is not None:
        raise click.UsageError("give one of --checkpoint PATH or --hub NAME, not both")
    if (cache is None) != (manifest is None):
        raise click.UsageError("give --cache CACHE and --manifest M together (the manifest the cache was built from)")
    if not (checkpoint or hub_name or cache or runs):
        raise click.UsageError("nothing to serve: give --checkpoint/--hub, --cache with --manifest, and/or --runs")
    try:
        from stage2_student_distill.app.serve.app import Served, create_app, make_server
    except ImportError as e:
        raise click.ClickException(f"pipeline serve needs Flask ({e}); install the extra: pip install "
                                   "'mealv2-pipeline[serve]'") from None
    from common.runtime import build_runtime

    cfg = resolve_config(ctx, {"runtime__device": runtime__device})
    with user_errors():
        try:
            device = build_runtime(cfg.runtime, init_distributed=False).device
        except RuntimeError as e:  # e.g. cuda asked for on a machine without it
            raise ValueError(str(e)) from None
        served = Served(checkpoint, hub_name, hub_weights, cache, manifest, runs, device, max_pixels, max_predictions)
        server = make_server(create_app(served, max_upload_mb << 20), host, port)
    if not _is_local(host):
        click.echo(f"warning: serving on {host}, reachable from other machines; the pages have no login", err=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving on http://{shown}:{server.server_port}/ (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
