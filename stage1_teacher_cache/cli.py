"""`pipeline teacher-cache` and `pipeline cache info|verify`: thin shells over run() and the cache format."""
from __future__ import annotations

import json

import click

from common.cache_format import verify_cache
from common.cli_support import resolve_config, user_errors
from common.manifest import load_manifest


@click.command("teacher-cache")
@click.option("--teachers", help="Comma-separated timm names or MEAL V2 aliases, e.g. senet154,resnest269.")
@click.option("--teacher-weights", multiple=True, metavar="NAME=PATH",
              help="Local weights for a teacher: safetensors, state dict or `pipeline train` checkpoint (repeatable).")
@click.option("--input-size", "input_sizes", multiple=True, metavar="NAME=SIZE",
              help="Override a teacher's input size (repeatable).")
@click.option("--manifest", type=click.Path(dir_okay=False), help="Training manifest (data.manifest).")
@click.option("--out", type=click.Path(file_okay=False), help="Cache directory; rerun to resume.")
@click.option("--topk", type=int, help="Classes kept per crop.")
@click.option("--temperature", type=float, help="Softmax temperature of each teacher.")
@click.option("--batch-size", type=int, help="Crops per teacher forward pass.")
@click.option("--images-per-shard", type=int, help="Images per shard (unit of work and resume).")
@click.option("--num-crops", type=int, help="Crops cached per image (crops.num_crops).")
@click.option("--crop-seed", type=int, help="Seed of the crop boxes (crops.seed).")
@click.option("--loader", type=click.Choice(["auto", "dali", "torch"]), help="Crop decoding/rendering path.")
@click.option("--evaluate-teachers", "evaluate_manifest", type=click.Path(dir_okay=False), metavar="VAL_MANIFEST",
              help="Measure each teacher and the ensemble on this manifest first; stop if one is near chance.")
@click.option("--pretrained/--no-pretrained", default=None,
              help="timm hub weights for teachers without --teacher-weights (default: [teacher_cache] pretrained).")
@click.pass_context
def teacher_cache_command(ctx: click.Context, **flags) -> None:
    """Run the teacher ensemble over C seeded crops of every image and cache the top-k soft labels."""
    from stage1_teacher_cache.run import run  # torch/timm load only when the command runs

    keys = {
        "teachers": "teacher_cache.teachers",
        "teacher_weights": "teacher_cache.teacher_weights",
        "input_sizes": "teacher_cache.input_sizes",
        "manifest": "data.manifest",
        "out": "teacher_cache.out",
        "topk": "teacher_cache.topk",
        "temperature": "teacher_cache.temperature",
        "batch_size": "teacher_cache.batch_size",
        "images_per_shard": "teacher_cache.images_per_shard",
        "num_crops": "crops.num_crops",
        "crop_seed": "crops.seed",
        "loader": "teacher_cache.loader",
        "evaluate_manifest": "teacher_cache.evaluate_manifest",
        "pretrained": "teacher_cache.pretrained",
    }
    cfg = resolve_config(ctx, {keys[name]: value for name, value in flags.items()})
    with user_errors():
        run(cfg)


@click.group("cache")
def cache_group() -> None:
    """Inspect and check teacher caches."""


@cache_group.command("info")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_command(cache: str, as_json: bool) -> None:
    """Metadata of CACHE: manifest, teachers, crop policy, storage, completeness, size."""
    from stage1_teacher_cache.info import cache_info, format_cache_info

    with user_errors():
        info = cache_info(cache)
    click.echo(json.dumps(info, indent=2) if as_json else format_cache_info(info))


@cache_group.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--manifest", type=click.Path(dir_okay=False), help="Also check the cache was built from this manifest.")
def verify_command(cache: str, manifest: str | None) -> None:
    """Check CACHE: format, completeness, per-shard checksums, probability mass. Exit 1 on any problem."""
    with user_errors():
        manifest_hash = load_manifest(manifest).content_hash if manifest else None
        problems = verify_cache(cache, manifest_hash=manifest_hash)
    for problem in problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {cache}; rebuild the named shards "
                                   "(delete the cache or rerun `pipeline teacher-cache` into a fresh --out)")
    click.echo(f"OK: {cache} is complete and every shard matches its checksum")
