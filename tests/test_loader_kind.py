"""``loader = "auto" | "dali" | "torch"``: one rule for both stages (common.loader_kind)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from common import loader_kind
from common.config import ConfigError
from common.loader_kind import choose_loader, dali_available
from common.models import Preprocess
from common.runtime import Runtime
from stage1_teacher_cache.views import make_renderer

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, channels_last=False)
# choose_loader only asks the runtime where it runs: no GPU is needed to describe one.
CUDA = Runtime(device=torch.device("cuda", 0), dtype=torch.bfloat16, channels_last=True)


@pytest.fixture
def dali_importable(monkeypatch):
    monkeypatch.setattr(loader_kind, "dali_available", lambda: True)


@pytest.fixture
def no_dali(monkeypatch):
    monkeypatch.setattr(loader_kind, "dali_available", lambda: False)


def test_auto_is_torch_on_cpu_even_with_dali_importable(dali_importable):
    assert choose_loader("auto", CPU) == "torch"


def test_auto_is_dali_on_cuda_when_importable(dali_importable):
    assert choose_loader("auto", CUDA) == "dali"


def test_auto_falls_back_to_torch_on_cuda_without_dali(no_dali):
    assert choose_loader("auto", CUDA) == "torch"


def test_explicit_choices_are_honoured(dali_importable):
    assert choose_loader("dali", CPU) == "dali"  # DALI's CPU pipeline, when asked for
    assert choose_loader("torch", CUDA) == "torch"


def test_dali_asked_for_but_not_importable_names_the_setting_and_the_remedy(no_dali):
    for key in ("teacher_cache.loader", "optim.loader"):
        with pytest.raises(ConfigError, match=rf'{key} = "dali" but NVIDIA DALI does not import here.*"torch"'):
            choose_loader("dali", CPU, key)


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.loader = 'fast': use one of auto, dali, torch"):
        choose_loader("fast", CPU, "optim.loader")


def test_dali_available_is_false_when_the_import_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "common.dali_crops", None)  # makes `import common.dali_crops` raise ImportError
    assert dali_available() is False


def test_both_stages_use_the_rule(dali_importable, monkeypatch, tmp_path):
    """Stage 1's renderer and stage 2's loader both resolve "auto" on a CPU to torch, even with DALI importable."""
    from stage2_student_distill import loaders

    chosen = []
    monkeypatch.setattr(loaders, "Loader", lambda kind, **kw: chosen.append(kind))
    loaders.build_loader("auto", manifest=None, mode="eval", preprocess=None, batch_size=1, runtime=CPU)
    assert chosen == ["torch"]

    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    pre = Preprocess(4, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    render = make_renderer("auto", CPU, [pre], 1, 1)  # a DALI renderer would need DALI, which this fakes
    (views,) = render([str(tmp_path / "a.png")], [np.array([[[0, 0, 8, 8]]])], np.zeros((1, 1), np.uint8))
    assert views.shape == (1, 3, 4, 4) and views[0, :, 0, 0].tolist() == [10, 20, 30]
