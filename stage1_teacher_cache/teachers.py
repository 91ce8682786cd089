"""The teachers of the ensemble: which model, which weights, which pixels.

A teacher is loaded once, put in eval mode on the runtime's device and frozen.
Its identity in the cache (timm name, weights hash, preprocessing) is what a
later run must match to append to the cache; where the weights file lives is
not part of it, so a cache can be finished on another host with the same file
under another path.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import ConfigError, TeacherCacheConfig, parse_assignments
from common.models import IMAGENET_CLASSES, Preprocess, WeightsError, create_model, file_sha256, resolve_name
from common.runtime import Runtime


@dataclass
class Teacher:
    name: str  # as the user wrote it (an alias or a timm name)
    timm_name: str
    model: nn.Module
    preprocess: Preprocess
    weights: str  # "file" | "timm-pretrained" | "random-init"
    weights_path: str | None
    weights_sha256: str | None
    init_seed: int | None  # only for random-init teachers (tests, smoke runs)

    def identity(self) -> dict[str, Any]:
        """What must be equal for two runs to share a cache (JSON-ready)."""
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "init_seed": self.init_seed,
            "params": sum(p.numel() for p in self.model.parameters()),
            "preprocess": self.preprocess.to_dict(),
        }


def teacher_options(cfg: TeacherCacheConfig) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Teacher names, NAME -> weights path, NAME -> input size; every NAME must be a teacher."""
    names = list(cfg.teachers)
    if not names:
        raise ConfigError("teacher_cache.teachers is empty; name at least one teacher (--teachers a,b)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"teacher_cache.teachers names {repeated} more than once; each teacher once")
    weights = parse_assignments(cfg.teacher_weights, "teacher_cache.teacher_weights")
    raw_sizes = parse_assignments(cfg.input_sizes, "teacher_cache.input_sizes")
    for key, given in (("teacher_weights", weights), ("input_sizes", raw_sizes)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(f"teacher_cache.{key} names {unknown}, which are not among the teachers {names}")
    sizes = {}
    for name, text in raw_sizes.items():
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"teacher_cache.input_sizes: {name}={text!r} is not a positive integer size")
        sizes[name] = int(text)
    return names, weights, sizes


def load_teachers(cfg: TeacherCacheConfig, num_classes: int, runtime: Runtime, seed: int) -> list[Teacher]:
    """Build every teacher on ``runtime.device``, eval mode, no gradients."""
    names, weights, sizes = teacher_options(cfg)
    teachers = []
    for name in names:
        path = weights.get(name)
        if path:
            source = "file"
        elif cfg.pretrained:
            source = "timm-pretrained"
            if num_classes != IMAGENET_CLASSES:
                raise WeightsError(
                    f"teacher {name}: timm pretrained weights have {IMAGENET_CLASSES} ImageNet classes but the "
                    f"manifest has {num_classes}; pass weights trained on this dataset with "
                    f"--teacher-weights {name}=PATH (e.g. a `pipeline train` checkpoint)"
                )
        else:
            source = "random-init"
            print(
                f"warning: teacher {name} has random weights (no --teacher-weights and --no-pretrained); "
                "its soft labels are noise -- fine for a smoke test only",
                file=sys.stderr,
            )
        # Seeded so that a random-init teacher is the same model in every run (resume needs that).
        torch.manual_seed(seed)
        model, pre = create_model(name, num_classes, pretrained=source == "timm-pretrained",
                                  weights=path, input_size=sizes.get(name))
        model = model.to(runtime.device, memory_format=runtime.memory_format()).eval().requires_grad_(False)
        teachers.append(
            Teacher(
                name=name,
                timm_name=resolve_name(name),
                model=model,
                preprocess=pre,
                weights=source,
                weights_path=str(Path(path).absolute()) if path else None,
                weights_sha256=file_sha256(path) if path else None,
                init_seed=seed if source == "random-init" else None,
            )
        )
    return teachers
