"""`pipeline predict` and `pipeline export`: using a trained model (thin shells over predict.py / export.py)."""
from __future__ import annotations

import json

import click

from common.cli_support import config_options, resolve_config, user_errors

_HUB_HELP = ("A released MEAL V2 model: mealv1_resnest50, mealv2_resnest50, mealv2_resnest50_cutmix, "
             "mealv2_resnest50_380x380, mealv2_mobilenetv3_small_075, mealv2_mobilenetv3_small_100, "
             "mealv2_mobilenet_v3_large_100, mealv2_efficientnet_b0.")
_HUB_WEIGHTS_HELP = ("Weights for --hub: a local .pth/.safetensors file or a URL [default: the release URL, "
                     "read from the torch hub cache $TORCH_HOME/hub/checkpoints when present].")
_CHECKPOINT_HELP = "A `pipeline distill/train` checkpoint (RUN/best.pt) or a `pipeline export` .safetensors."


def _model_options(command):
    command = click.option("--hub-weights", metavar="PATH|URL", help=_HUB_WEIGHTS_HELP)(command)
    command = click.option("--hub", "hub_name", metavar="NAME", help=_HUB_HELP)(command)
    command = click.option("--checkpoint", type=click.Path(dir_okay=False), help=_CHECKPOINT_HELP)(command)
    return command


def _one_model(checkpoint, hub_name, hub_weights) -> None:
    if (checkpoint is None) == (hub_name is None):
        raise click.UsageError("give exactly one of --checkpoint PATH or --hub NAME")
    if hub_weights and hub_name is None:
        raise click.UsageError("--hub-weights goes with --hub NAME")


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_model_options
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="Take class names from this manifest (for checkpoints that do not record them).")
@click.option("--topk", type=int, default=5, show_default=True, help="Classes shown per image.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per forward pass.")
@config_options({"--device": ("runtime.device", dict(help="auto | cpu | cuda | cuda:N."))})
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one list of {image, top: [{index, name, prob}]}).")
@click.pass_context
def predict_command(ctx: click.Context, images, checkpoint, hub_name, hub_weights, manifest, topk, batch_size,
                    runtime__device, as_json) -> None:
    """Top-k classes of IMAGE... with names and probabilities, using the model's own preprocessing.

    Class names come from the checkpoint, else --manifest, else ImageNet's for
    1000-class models.
    """
    from common.runtime import build_runtime
    from stage2_student_distill.predict import format_predictions, run_predict

    _one_model(checkpoint, hub_name, hub_weights)
    cfg = resolve_config(ctx, {"runtime__device": runtime__device})
    with user_errors():
        device = build_runtime(cfg.runtime, init_distributed=False).device  # ConfigError: e.g. no CUDA
        predictions = run_predict(images, checkpoint=checkpoint, hub=hub_name, hub_weights=hub_weights,
                                  manifest=manifest, topk=topk, batch_size=batch_size, device=device)
    click.echo(json.dumps([p.to_dict() for p in predictions], indent=2) if as_json else format_predictions(predictions))


@click.command("export")
@_model_options
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx"]),
              help="Output format [default: from the --out suffix].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (.safetensors or .onnx).")
@click.option("--opset", type=int, help="ONNX opset [default: the exporter's].")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="ONNX check: relative tolerance.")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="ONNX check: absolute tolerance, times max(1, largest |logit|).")
def export_command(checkpoint, hub_name, hub_weights, fmt, out, opset, rtol, atol) -> None:
    """Write a deployable model: safetensors (weights + JSON metadata) or ONNX (dynamic batch, verified).

    The ONNX file is checked against PyTorch with onnxruntime before it is
    written; a mismatch beyond the tolerances fails the command.
    """
    from stage2_student_distill.export import infer_format, run_export
    from stage2_student_distill.predict import load_model

    _one_model(checkpoint, hub_name, hub_weights)
    with user_errors():
        infer_format(out, fmt)  # fail on a bad --out before loading the model
        loaded = load_model(checkpoint, hub_name, hub_weights, device="cpu")
        result = run_export(loaded, out, fmt=fmt, opset=opset, rtol=rtol, atol=atol)
    meta, pre = loaded.meta, loaded.preprocess
    line = (f"wrote {result['out']} ({result['format']}): {meta['model']}, {meta['num_classes']} classes, "
            f"input {pre.input_size}px")
    if result["format"] == "onnx":
        line += (f", opset {result['opset']}; onnxruntime matches PyTorch "
                 f"(max |diff| {result['max_abs_diff']:.2g} at batch 1 and 3)")
    click.echo(line)
