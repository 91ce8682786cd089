"""`pipeline teacher-cache` and `pipeline cache ...`: thin shells over run(), the cache format and sharing.

CACHE arguments are local directories or fsspec URLs (file://, s3://, memory://, ...),
so they are plain strings here and the cache format reports what is missing.
"""
from __future__ import annotations

import json

import click

from common.cache_format import repair_cache, verify_cache
from common.cli_support import config_options, resolve_config, user_errors
from common.config import LOADERS
from common.manifest import check_image_files, load_manifest


_INPUT_OPTIONS = {
    "--teachers": ("teacher_cache.teachers", dict(help="Comma-separated timm names or MEAL V2 aliases, e.g. senet154,resnest269.")),
    "--teacher-weights": ("teacher_cache.teacher_weights", dict(
        multiple=True, metavar="NAME=PATH",
        help="Local weights for a teacher: safetensors, state dict or `pipeline train` checkpoint (repeatable).")),
    "--input-size": ("teacher_cache.input_sizes", dict(multiple=True, metavar="NAME=SIZE",
                                                       help="Override a teacher's input size (repeatable).")),
    "--manifest": ("data.manifest", dict(type=click.Path(dir_okay=False), help="Training manifest.")),
    "--out": ("teacher_cache.out", dict(help="Cache directory or fsspec URL; rerun to resume.")),
}
_CACHE_OPTIONS = {
    "--topk": ("teacher_cache.topk", dict(type=int, help="Classes kept per crop.")),
    "--temperature": ("teacher_cache.temperature", dict(type=float, help="Softmax temperature of each teacher.")),
    "--batch-size": ("teacher_cache.batch_size", dict(type=int, help="Crops per teacher forward pass.")),
    "--images-per-shard": ("teacher_cache.images_per_shard", dict(type=int, help="Images per shard (unit of work and resume).")),
    "--num-crops": ("crops.num_crops", dict(type=int, help="Crops cached per image.")),
    "--crop-seed": ("crops.seed", dict(type=int, help="Seed of the crop boxes.")),
    "--loader": ("teacher_cache.loader", dict(type=click.Choice(LOADERS), help="Crop decoding/rendering path.")),
    "--evaluate-teachers": ("teacher_cache.evaluate_manifest", dict(
        type=click.Path(dir_okay=False), metavar="VAL_MANIFEST",
        help="Measure each teacher, the ensemble and each leave-one-out ensemble on this manifest first; "
             "warn if a teacher lowers the ensemble (docs/teachers.md); stop if one is near chance.")),
    "--hard-label-top1": ("distill.hard_label_top1", dict(type=float, metavar="PCT", help=(
        "With --evaluate-teachers: top-1 of a short hard-label run of the student (E/4 epochs); warn before "
        "caching if distilling is not expected to beat the labels (docs/teachers.md)."))),
    "--pretrained/--no-pretrained": ("teacher_cache.pretrained", dict(
        default=None, help="timm hub weights for teachers without --teacher-weights.")),
}


@click.command("teacher-cache")
@config_options(_INPUT_OPTIONS)
@click.option("--reuse-crops", metavar="CACHE",
              help="Use the crop boxes and flips stored in CACHE (same manifest) instead of drawing them from the "
                   "seed, so the new cache can be merged with CACHE (`pipeline cache merge`).")
@click.option("--more-crops", type=click.IntRange(min=1), metavar="N",
              help="Grow the complete cache --out (built with these same settings) from its C crops per image to "
                   "C+N: crops C..C+N-1 continue the seed; rerun to resume. C is the cache's unless --num-crops C "
                   "(then a rerun after it finished adds nothing; docs/cache-format.md, Growing).")
@config_options(_CACHE_OPTIONS)
@click.pass_context
def teacher_cache_command(ctx: click.Context, reuse_crops: str | None, more_crops: int | None, **flags) -> None:
    """Run the teacher ensemble over C seeded crops of every image and cache the top-k soft labels."""
    from stage1_teacher_cache.run import run  # torch/timm load only when the command runs

    cfg = resolve_config(ctx, flags)
    with user_errors():
        if more_crops and flags["crops__num_crops"] is None:  # the cache records its C; an explicit one is checked
            from common.cache_format import open_attrs
            from stage1_teacher_cache.grow import recorded_crops

            have = recorded_crops(open_attrs(cfg.teacher_cache.out)) if cfg.teacher_cache.out else None
            cfg = cfg.replace(**{"crops.num_crops": have}) if have else cfg
        run(cfg, reuse_crops=reuse_crops, more_crops=more_crops or 0)


@click.group("cache")
def cache_group() -> None:
    """Inspect, check, combine, cut and transfer teacher caches."""


@cache_group.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_command(cache: str, as_json: bool) -> None:
    """Metadata of CACHE: manifest, teachers, crop policy, storage, completeness, size."""
    from stage1_teacher_cache.info import cache_info, format_cache_info

    with user_errors():
        info = cache_info(cache)
    click.echo(json.dumps(info, indent=2) if as_json else format_cache_info(info))


@cache_group.command("verify")
@click.argument("cache")
@click.option("--manifest", type=click.Path(dir_okay=False), help="Also check the cache was built from this manifest.")
@click.option("--repair", is_flag=True,
              help="Reset the completion record of damaged shards, so that rerunning the command that wrote the "
                   "cache (teacher-cache, merge or subset) recomputes them. Not while that command runs.")
@click.option("--check-images", is_flag=True,
              help="With --manifest: also read every image file and compare its digest (sha256) with the "
                   "manifest's, finding files replaced after the build (reads the whole dataset; off by default).")
def verify_command(cache: str, manifest: str | None, repair: bool, check_images: bool) -> None:
    """Check CACHE: format, completeness, per-shard checksums, probability mass. Exit 1 on any problem."""
    if check_images and not manifest:
        raise click.UsageError("--check-images compares the images with a manifest: give --manifest M")
    with user_errors():
        loaded = load_manifest(manifest, with_digests=check_images) if manifest else None
        # a cache that cannot be opened at all is one error line, not a "problem" list
        scope = dict(manifest_hash=loaded and loaded.content_hash, manifest_images=loaded and loaded.num_images,
                     report_unopenable=False)
        problems, reset = repair_cache(cache, **scope) if repair else (verify_cache(cache, **scope), [])
    for problem in problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    if reset:
        raise click.ClickException(f"reset the completion record of shard(s) {reset}; rerun the command that "
                                   "wrote the cache (same arguments) to recompute them")
    if check_images:
        with user_errors():
            checked = check_image_files(loaded)
    if problems:
        hint = ("rerun the command that wrote it to finish incomplete shards; `--repair` resets damaged ones"
                if any("shard" in p for p in problems) else "the cache cannot be read as listed")
        raise click.ClickException(f"{len(problems)} problem(s) in {cache}; {hint}")
    images = f"; all {checked:,} images match {manifest}" if check_images else ""
    click.echo(f"OK: {cache} is complete and every shard matches its checksum{images}")


@cache_group.command("abandon-growth")
@click.argument("cache")
def abandon_growth_command(cache: str) -> None:
    """Drop CACHE's unfinished `teacher-cache --more-crops` growth: CACHE is its old self again.

    Only before the grown arrays are swapped in (the old arrays are untouched until then);
    not while the growing command runs.
    """
    from stage1_teacher_cache.grow import abandon

    with user_errors():
        marker = abandon(cache)
    click.echo(f"abandoned the growth of {cache} from {marker['from_crops']} to {marker['to_crops']} crops per image; "
               f"it is the {marker['from_crops']}-crop cache again")


@cache_group.command("merge")
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged cache (directory or URL); rerun to resume.")
@click.option("--topk", type=int, help="Classes kept per crop (default: the smallest k of the inputs).")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="The manifest the caches were built from: record the merged ensemble's agreement with its labels.")
def merge_command(caches: tuple[str, ...], out: str, topk: int | None, manifest: str | None) -> None:
    """Average CACHES (same manifest, crops and classes; disjoint teachers) into one ensemble cache.

    Each input's dense targets are restored from its top-k, averaged with a weight proportional to its
    number of teachers and cut to top-k again; docs/cache-format.md ("Merging") measures the loss.
    A --topk above the inputs' smallest k keeps classes whose probability is partly the inputs'
    uniform residual, i.e. a guess.
    """
    from stage1_teacher_cache.sharing import merge_caches

    with user_errors():
        s = merge_caches(caches, out, topk=topk, manifest_path=manifest)
    click.echo(f"merged {len(s['sources'])} caches into {s['cache']}: teachers {', '.join(s['teachers'])}, "
               f"weights {', '.join(f'{w:.3f}' for w in s['weights'])}, top-{s['k']}; "
               f"wrote {s['shards_written']} of {s['shards_total']} shard(s)")


@cache_group.command("subset")
@click.argument("cache")
@click.option("--out", required=True, help="The new cache (directory or URL).")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="The manifest CACHE was built from.")
@click.option("--subset-manifest-out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the manifest of the selected images (same root, dense image ids).")
@click.option("--classes", help="Comma-separated class names: keep the images labelled with them.")
@click.option("--image-ids", metavar="FILE|RANGES",
              help="A file of image ids (whitespace/comma separated, # comments) or ranges like 0:1000,2000:2500 "
                   "(stop excluded) and single ids.")
def subset_command(cache: str, out: str, manifest: str, subset_manifest_out: str, classes: str | None,
                   image_ids: str | None) -> None:
    """Cut CACHE down to some images, writing the matching manifest too.

    Image ids are positions in a manifest, so the subset gets its own manifest (images in their
    original order, renumbered 0..n-1) and the cache is tied to it. Subsetting by class keeps the
    label space: num_classes and class names are unchanged, and targets still spread over every class.
    """
    from stage1_teacher_cache.sharing import subset_cache

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
    with user_errors():
        s = subset_cache(cache, out, manifest, subset_manifest_out, classes=names, image_ids=image_ids)
    click.echo(f"subset of {s['images']:,} images: manifest {s['manifest']} ({s['manifest_hash'][:16]}...), "
               f"cache {s['cache']} ({s['shards_written']} of {s['shards_total']} shard(s) written)")


@cache_group.command("reduce")
@click.argument("cache")
@click.option("--out", required=True, help="The new cache (directory or URL); rerun to resume.")
@click.option("--topk", required=True, type=int, help="Classes kept per crop, below CACHE's k.")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="The manifest CACHE was built from: record OUT's agreement with its labels.")
def reduce_command(cache: str, out: str, topk: int, manifest: str | None) -> None:
    """Copy CACHE keeping each crop's TOPK most probable classes (fewer bytes; no teacher runs).

    The kept probabilities are the stored ones, so OUT equals what `teacher-cache --topk TOPK` would
    have written on the same crops; the dropped mass joins the residual spread over the other classes.
    """
    from stage1_teacher_cache.sharing import reduce_topk

    with user_errors():
        s = reduce_topk(cache, out, topk, manifest_path=manifest)
    click.echo(f"reduced {s['source']} from top-{s['source_k']} to top-{s['k']} in {s['cache']}: "
               f"wrote {s['shards_written']} of {s['shards_total']} shard(s)")


@cache_group.command("pack")
@click.argument("cache")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The pack file (a local tar).")
def pack_command(cache: str, out: str) -> None:
    """Write CACHE as one uncompressed tar with a sha256 per file, for transfer."""
    from stage1_teacher_cache.pack import pack_cache

    with user_errors():
        s = pack_cache(cache, out)
    note = "" if s["complete"] else " (the cache is incomplete: finish it after unpacking)"
    click.echo(f"packed {s['files']} files into {s['pack']} ({s['bytes']:,} bytes){note}")


@cache_group.command("unpack")
@click.argument("pack", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New cache directory (must not exist).")
def unpack_command(pack: str, out: str) -> None:
    """Unpack a `cache pack` file into OUT, checking every file's sha256; nothing is written on a mismatch."""
    from stage1_teacher_cache.pack import unpack_cache

    with user_errors():
        s = unpack_cache(pack, out)
    click.echo(f"unpacked {s['files']} files into {s['cache']}; every checksum matched")
