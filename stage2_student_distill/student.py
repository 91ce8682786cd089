"""The student's initial weights and preprocessing, as `pipeline distill` builds them.

MEAL V2 always starts the student from ImageNet-pretrained timm weights
(``timm.create_model(name, pretrained=True)`` in the original's
models/model_factory.py); a recipe says so with ``distill.pretrained = true``
and a tagged timm name (``resnet50.ram_in1k``). timm downloads those weights;
an offline machine passes the same file with ``--student-weights PATH``,
which wins. When neither works the error names both, on one line.
"""
from __future__ import annotations

import timm
from torch import nn

from common.config import Config
from common.errors import cause_text
from common.models import Preprocess, WeightsError, apply_preprocess_config, create_model, resolve_name


def create_student(cfg: Config, num_classes: int) -> tuple[nn.Module, Preprocess]:
    d = cfg.distill
    weights = d.student_weights or None
    try:
        model, pre = create_model(d.student, num_classes, pretrained=d.pretrained and not weights,
                                  weights=weights, input_size=cfg.optim.img_size or None)
    except WeightsError as e:
        if weights or not d.pretrained or not timm.is_model(resolve_name(d.student)):
            raise  # a bad file or an unknown name: create_model's message says so
        timm_failure = cause_text(e.__cause__ or e.__context__ or e)  # create_model's cause or context
        raise WeightsError(
            f"student {d.student}: timm hub weights could not be fetched ({timm_failure}) and no "
            f"--student-weights was given; on an offline machine download {hub_file(d.student)} elsewhere "
            "and pass --student-weights PATH (distill.student_weights)"
        ) from e
    return model, apply_preprocess_config(pre, cfg.preprocess)


def hub_file(name: str) -> str:
    """Where the student's pretrained weights live (timm's pretrained config), for the error message."""
    try:
        pcfg = timm.models.get_pretrained_cfg(resolve_name(name))
    except Exception:  # this only words a message: no tag known to timm, say so plainly
        pcfg = None
    where = [pcfg.url, f"https://huggingface.co/{pcfg.hf_hub_id}" if pcfg.hf_hub_id else ""] if pcfg else []
    return " or ".join(w for w in where if w) or f"the timm weights of {name}"
