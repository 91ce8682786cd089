"""Click commands for manifests and the Fashion-MNIST adapter (registered by stage2_student_distill/app/cli.py)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from common.cli_support import user_errors
from data_manifests.build import build_manifest, format_manifest_info, manifest_info
from data_manifests.fashion_mnist import prepare_fashion_mnist


@click.group("manifest")
def manifest_group():
    """Build and inspect image manifests (Parquet)."""


@manifest_group.command("build")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", required=True, help="Manifest file to write: a path or fsspec URL (s3://bucket/m.parquet).")
@click.option("--skip-bad", is_flag=True, help="Record bad inputs in OUT_STEM.rejects.jsonl instead of failing.")
@click.option("--description", default="", help="Free text stored in the manifest metadata.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def build_command(root: Path, out: str, skip_bad: bool, description: str, progress: bool):
    """Build a manifest from an ImageFolder tree ROOT/<class>/<image>."""
    with user_errors():
        manifest = build_manifest(root, out, skip_bad=skip_bad, description=description, progress=progress)
    click.echo(
        f"wrote {out}: {manifest.num_images} images, {manifest.num_classes} classes, "
        f"content hash {manifest.content_hash}"
    )


@manifest_group.command("info")
@click.argument("manifest")  # a path or fsspec URL; load_manifest says what is missing
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--data-root", default=None, help="Image root to report instead of the recorded one.")
def info_command(manifest: str, as_json: bool, data_root: str | None):
    """Verify a manifest and summarise it (images, classes, sizes, hash)."""
    with user_errors():
        info = manifest_info(manifest, data_root=data_root)
    click.echo(json.dumps(info, indent=2, ensure_ascii=False) if as_json else format_manifest_info(info))


@click.command("fashion-mnist")
@click.option(
    "--source",
    default="/usr/share/datasets/fashion-mnist",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder with the Fashion-MNIST IDX files (.gz or not).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--train-limit", type=click.IntRange(min=1), default=None, help="Class-balanced training subset size.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Class-balanced test subset size.")
def fashion_mnist_command(source: Path, out: Path, train_limit: int | None, test_limit: int | None):
    """Convert Fashion-MNIST IDX files into PNG ImageFolder trees OUT/train and OUT/test."""
    with user_errors():
        train_root, test_root = prepare_fashion_mnist(source, out, train_limit=train_limit, test_limit=test_limit)
    click.echo(f"train images: {train_root}\ntest images:  {test_root}")
    click.echo(f"next: pipeline manifest build {train_root} --out {out / 'train.parquet'}")
