"""`pipeline export`: a distilled student (or a released MEAL V2 model) as a deployable file.

* **safetensors**: the weights plus the model's metadata as JSON under the
  ``"meta"`` key of the safetensors header (model name, classes, class names,
  preprocessing), so ``common.models.read_weights`` / ``create_model(...,
  weights=PATH)`` / ``meal_v2_checkpoint(PATH)`` / ``pipeline predict
  --checkpoint PATH`` read it back with no pickle involved.
* **onnx**: ``torch.onnx.export`` (the dynamo exporter) with a dynamic batch
  axis; input ``input`` float32 [batch, 3, S, S] already normalised (mean/std
  and the crop rule are in the model's ``meal.meta`` metadata property),
  output ``logits`` [batch, classes]. The file is only put in place after
  onnxruntime reproduced PyTorch's logits within tolerance at two batch sizes
  other than the traced one; otherwise the export fails and nothing is written.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write_bytes
from common.errors import PipelineError
from stage2_student_distill.hub import LoadedModel

ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
_ONNX_SINGLE_FILE_LIMIT = 1.8 * 2**30  # protobuf's 2 GiB cap, with headroom for the graph


class ExportError(PipelineError):
    """The export cannot be written, or the exported model does not reproduce PyTorch's."""


def infer_format(out: str | os.PathLike, fmt: str | None) -> str:
    """``fmt`` (--format, one of click's choices) if given, else from the file suffix (.safetensors / .onnx);
    refuses an ``out`` that cannot hold that export."""
    suffix = Path(out).suffix.lower()
    if fmt is None:
        fmt = {".safetensors": "safetensors", ".onnx": "onnx"}.get(suffix)
        if fmt is None:
            raise ExportError(f"cannot tell the format from {out!s}; give --format safetensors|onnx")
    if fmt == "safetensors" and suffix != ".safetensors":
        # read_weights recognises safetensors by the suffix; anything else would be torch.load-ed.
        raise ExportError(f"--out {out!s}: a safetensors export must end in .safetensors")
    if Path(out).is_dir():
        raise ExportError(f"--out {out!s} is a directory; give a file name")
    return fmt


def export_safetensors(loaded: LoadedModel, out: str | os.PathLike) -> dict[str, Any]:
    """Weights + JSON metadata, written atomically."""
    from safetensors.torch import save

    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {**loaded.meta, "export_format": "safetensors"}
    atomic_write_bytes(out, save(tensors, metadata={"format": "pt", "meta": json.dumps(meta, default=str)}))
    return {"out": str(out), "format": "safetensors", "tensors": len(tensors)}


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)} (not installed): pip install onnx onnxscript onnxruntime"
        )


def _probe(size: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


@torch.no_grad()
def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    input_size: int,
    batch_sizes: tuple[int, ...] = (1, 3),
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Run ``path`` in onnxruntime and ``model`` in PyTorch on the same inputs; raise if they differ.

    Passes when ``|ort - torch| <= atol * max(1, max|torch|) + rtol * |torch|``
    elementwise, for every batch size. Returns the largest absolute difference.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval()
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        x = _probe(input_size, batch, seed=1234 + i)
        ref = model(x).float().numpy()
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{path}: ONNX output has shape {got.shape} for batch {batch}, PyTorch {ref.shape}")
        diff = np.abs(got.astype(np.float64) - ref)
        bound = atol * max(1.0, float(np.abs(ref).max())) + rtol * np.abs(ref)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= bound):
            j = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
            raise ExportError(
                f"{path}: the ONNX model does not reproduce PyTorch (batch {batch}): max |diff| "
                f"{diff.max():.3g}, at {tuple(int(v) for v in j)} onnx {got[j]:.6g} vs torch {ref[j]:.6g} "
                f"(rtol {rtol}, atol {atol}); not exporting"
            )
    return worst


def export_onnx(
    loaded: LoadedModel,
    out: str | os.PathLike,
    opset: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """ONNX with a dynamic batch axis, verified against PyTorch before it is put in place."""
    _require_onnx()
    out = Path(out)
    model = loaded.model.to("cpu").eval()
    size = loaded.preprocess.input_size
    example = _probe(size, 2, seed=0)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = nbytes > _ONNX_SINGLE_FILE_LIMIT
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=external,
        )
    except Exception as e:  # the exporter raises many types; all mean "this model did not export"
        raise ExportError(
            f"torch.onnx.export failed for {loaded.meta.get('model')}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from e
    meta = {**loaded.meta, "export_format": "onnx", "input": ONNX_INPUT, "output": ONNX_OUTPUT,
            "input_layout": "float32 NCHW, normalised with preprocess.mean/std (0..1 pixel units)"}
    program.model.metadata_props["meal.meta"] = json.dumps(meta, default=str)
    program.model.producer_name = "mealv2-pipeline"

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp",
                                     ignore_cleanup_errors=True) as staging:
        staged = Path(staging) / out.name
        program.save(str(staged), external_data=external)
        max_diff = check_onnx(staged, model, size, rtol=rtol, atol=atol)
        for f in sorted(Path(staging).iterdir()):  # the .onnx, plus its .data file when external
            os.replace(f, out.parent / f.name)
    return {"out": str(out), "format": "onnx", "max_abs_diff": max_diff, "external_data": external,
            "opset": program.model.graph.opset_imports.get("")}


def run_export(loaded: LoadedModel, out: str | os.PathLike, fmt: str | None = None, opset: int | None = None,
               rtol: float = 1e-3, atol: float = 1e-4) -> dict[str, Any]:
    """`pipeline export`: ``loaded`` written as ``fmt`` (or the format ``out``'s suffix names)."""
    if infer_format(out, fmt) == "onnx":
        return export_onnx(loaded, out, opset=opset, rtol=rtol, atol=atol)
    return export_safetensors(loaded, out)
