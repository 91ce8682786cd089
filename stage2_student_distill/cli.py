"""`pipeline distill`, `pipeline train`, `pipeline evaluate`: thin shells over run_*().

Every flag is a config key (named in its help); a flag that is not given
leaves the value from pipeline.toml / --set untouched.
"""
from __future__ import annotations

from typing import Callable

import click

from common.cli_support import config_options, resolve_config, user_errors
from common.config import LOADERS, LOG_SINKS, PRECISIONS, SCHEDULES, Config

# Options shared by distill and train: flag -> (config key, click settings).
_LOOP_OPTIONS = {
    "--manifest": ("data.manifest", dict(type=click.Path(dir_okay=False), help="Training manifest.")),
    "--val-manifest": ("data.val_manifest", dict(type=click.Path(dir_okay=False), help="Validation manifest (scored every epoch).")),
    "--data-root": ("data.data_root", dict(type=click.Path(file_okay=False), help="Image root replacing the manifests' recorded root.")),
    "--epochs": ("optim.epochs", dict(type=int, help="Total epochs (with --resume it may grow under the step schedule, not under cosine).")),
    "--batch-size": ("optim.batch_size", dict(type=int, help="Training batch size per process.")),
    "--eval-batch-size": ("optim.eval_batch_size", dict(type=int, help="Validation batch size per process.")),
    "--lr": ("optim.lr", dict(type=float, help="Student learning rate (SGD, momentum optim.momentum).")),
    "--weight-decay": ("optim.weight_decay", dict(type=float, help="Student weight decay (MEAL V2: 0).")),
    "--schedule": ("optim.schedule", dict(type=click.Choice(SCHEDULES), help="Learning-rate schedule.")),
    "--lr-decay-epochs": ("optim.lr_decay_epochs", dict(metavar="E1,E2,...", help="Step schedule milestones.")),
    "--lr-decay-factor": ("optim.lr_decay_factor", dict(type=float, help="Step schedule factor per milestone.")),
    "--warmup-epochs": ("optim.warmup_epochs", dict(type=int, help="Linear warmup from lr/10 over these epochs.")),
    "--img-size": ("optim.img_size", dict(type=int, help="Input size (0: the model's default).")),
    "--loader": ("optim.loader", dict(type=click.Choice(LOADERS), help="Data loader.")),
    "--log-every": ("optim.log_every", dict(type=int, help="Steps between loss logs.")),
    "--log": ("optim.log", dict(type=click.Choice(LOG_SINKS),
                                help="Metrics sinks: metrics.jsonl, or metrics.jsonl + TensorBoard events (extra `tensorboard`).")),
    "--device": ("runtime.device", dict(help="auto | cpu | cuda | cuda:N.")),
    "--precision": ("runtime.precision", dict(type=click.Choice(PRECISIONS), help="Autocast dtype.")),
    "--seed": ("runtime.seed", dict(type=int, help="Seed of initialisation, shuffling and CutMix.")),
    "--num-workers": ("runtime.num_workers", dict(type=int, help="Decode workers / DALI threads.")),
    "--compile/--no-compile": ("runtime.compile", dict(default=None, help="torch.compile the student.")),
    "--progress/--no-progress": ("runtime.progress", dict(default=None, help="Progress bar (off: one line per epoch).")),
}


def _run_options(section: str, weights_flag: str) -> dict:
    """The options of a training command's own run, under its config section: the run directory, the starting
    weights (``weights_flag`` names the flag and the key), hub weights and resuming."""
    return {
        "--out": (f"{section}.out", dict(type=click.Path(file_okay=False), help="Run directory.")),
        weights_flag: (f"{section}.{weights_flag[2:].replace('-', '_')}",
                       dict(type=click.Path(dir_okay=False), help="Start from this local file.")),
        "--pretrained": (f"{section}.pretrained", dict(is_flag=True, flag_value=True, default=None,
                                                         help="Start from timm hub weights.")),
        "--resume": (f"{section}.resume", dict(is_flag=True, flag_value=True, default=None, help="Continue OUT/last.pt.")),
    }


_DISTILL_OPTIONS = {
    "--student": ("distill.student", dict(help="Student timm model name.")),
    "--cache": ("distill.cache", dict(help="Teacher cache from `pipeline teacher-cache`.")),
    **_run_options("distill", "--student-weights"),
    "--disc-lr": ("distill.disc_lr", dict(type=float, help="The discriminator's own learning rate.")),
    "--no-discriminator": ("distill.discriminator", dict(is_flag=True, flag_value=False, default=None, help="Ablate the discriminator (KL only).")),
    "--crops-per-image": ("distill.crops_per_image", dict(type=int, help="Cached crops per decoded image (FKD multi-crop).")),
    "--cutmix-prob": ("distill.cutmix_prob", dict(type=float, help="Probability of CutMix per batch.")),
    "--cutmix-alpha": ("distill.cutmix_alpha", dict(type=float, help="Beta(alpha, alpha) of the CutMix area.")),
    "--label-weight": ("distill.label_weight", dict(type=float, metavar="W",
                                                    help="Add W * cross entropy to the hard label (0: MEAL V2, no labels).")),
    "--hard-label-top1": ("distill.hard_label_top1", dict(type=float, metavar="PCT", help=(
        "Top-1 of a short hard-label run of the student (E/4 epochs): warn at start if distilling is not "
        "expected to beat the labels (docs/teachers.md)."))),
    "--check-images": ("distill.check_images", dict(is_flag=True, flag_value=True, default=None,
                                                    help="First compare every image file's sha256 with the manifests' "
                                                         "(finds replaced files; reads the whole dataset).")),
    # online MEAL V2: the teachers in the loop instead of a cache
    "--online": ("distill.online", dict(is_flag=True, flag_value=True, default=None,
                                        help="Run the teachers in the loop on fresh [crops] (no --cache).")),
    "--replay-cache": ("distill.replay_cache", dict(metavar="CACHE", help="With --online: score this cache's crops.")),
    "--teachers": ("teacher_cache.teachers", dict(metavar="A,B", help="With --online: the ensemble (timm names).")),
    "--teacher-weights": ("teacher_cache.teacher_weights", dict(multiple=True, metavar="NAME=PATH",
                                                                help="With --online: a teacher's weights (repeatable).")),
    "--teacher-input-size": ("teacher_cache.input_sizes", dict(multiple=True, metavar="NAME=SIZE",
                                                               help="With --online: a teacher's input size (repeatable).")),
    "--no-teacher-pretrained": ("teacher_cache.pretrained", dict(is_flag=True, flag_value=False, default=None,
                                                                 help="With --online: no timm hub weights for teachers.")),
}

_TRAIN_OPTIONS = {
    "--model": ("train.model", dict(help="timm model name.")),
    **_run_options("train", "--weights"),
    "--label-smoothing": ("train.label_smoothing", dict(type=float, help="Label smoothing of the cross entropy.")),
}


@click.command("distill")
@config_options({**_DISTILL_OPTIONS, **_LOOP_OPTIONS})
@click.pass_context
def distill_command(ctx: click.Context, **flags) -> None:
    """Train a student from a teacher cache (or --online, from live teachers): KL to the ensemble + MEAL V2 discriminator."""
    from stage2_student_distill.train import run_distill

    _train_and_report(ctx, flags, run_distill)


@click.command("train")
@config_options({**_TRAIN_OPTIONS, **_LOOP_OPTIONS})
@click.pass_context
def train_command(ctx: click.Context, **flags) -> None:
    """Train a model on hard labels (baselines; teachers for custom datasets)."""
    from stage2_student_distill.train import run_train

    _train_and_report(ctx, flags, run_train)


def _train_and_report(ctx: click.Context, flags: dict, run: Callable[[Config], dict]) -> None:
    cfg = resolve_config(ctx, flags)
    with user_errors():
        result = run(cfg)
    if result["is_main"]:  # under torchrun every rank returns; one reports
        click.echo(f"done: best val top-1 {result['best_top1']:.2f}%; checkpoints in {result['run_dir']}")


@click.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A `pipeline distill/train` checkpoint (RUN/best.pt or RUN/last.pt).")
@click.option("--manifest", type=click.Path(dir_okay=False), help="Manifest to score [default: data.val_manifest].")
@config_options({k: _LOOP_OPTIONS[k] for k in ("--data-root", "--eval-batch-size", "--loader", "--device",
                                                 "--precision", "--num-workers")})
@click.pass_context
def evaluate_command(ctx: click.Context, checkpoint: str, manifest: str | None, **flags) -> None:
    """Top-1 / top-5 / loss of a checkpoint (model, classes and preprocessing from its metadata)."""
    from stage2_student_distill.evaluate import run_evaluate

    cfg = resolve_config(ctx, flags)
    manifest = manifest or cfg.data.val_manifest
    if not manifest:
        raise click.UsageError("give --manifest (or set data.val_manifest)")
    with user_errors():
        result = run_evaluate(checkpoint, manifest, cfg)
    if result["is_main"]:
        click.echo(
            f"{result['checkpoint']} ({result['model']}) on {manifest}: top-1 {result['top1']:.2f}%  "
            f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  ({result['images']} images)"
        )
