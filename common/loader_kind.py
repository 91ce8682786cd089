"""Which crop-rendering path a stage uses, the one rule behind ``loader = "auto" | "dali" | "torch"``,
and the renderer it builds (:func:`build_renderer`: ``common.render``'s or its DALI twin's).

Both stages (``teacher_cache.loader``, ``optim.loader``) resolve the setting
here, so "auto" means the same everywhere:

* ``auto``: DALI when the runtime is on CUDA and DALI imports, else the
  pure-PyTorch path (``common.render``). On a CPU, DALI's CPU pipeline does
  not make training faster -- the student's step, not the loader, is the
  limit, and distill ran at the same speed with either loader
  (docs/performance.md, stage 2 table) -- while the torch path is the
  reference both are tested against and needs no extra dependency
  (docs/design-notes.md).
* ``dali``: DALI, on CUDA or on the CPU; an error if it does not import.
* ``torch``: the pure-PyTorch path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from common.config import LOADERS, ConfigError
from common.render import TorchRenderer, View

if TYPE_CHECKING:
    from common.runtime import Runtime


def dali_available() -> bool:
    """Whether DALI imports here (a broken install, e.g. missing shared libraries, counts as absent)."""
    try:
        import common.dali_crops  # noqa: F401  (imports nvidia.dali)
    except (ImportError, OSError):
        return False
    return True


def choose_loader(requested: str, runtime: Runtime, key: str = "loader") -> str:
    """``"dali"`` or ``"torch"`` for the setting ``requested``; ``key`` names the setting in errors."""
    if requested not in LOADERS:
        raise ConfigError(f"{key} = {requested!r}: use one of {', '.join(LOADERS)}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "dali" if runtime.is_cuda and dali_available() else "torch"
    if not dali_available():
        raise ConfigError(
            f'{key} = "dali" but NVIDIA DALI does not import here; install it '
            '(pip install nvidia-dali-cuda120) or use loader "torch" (or "auto")'
        )
    return "dali"


def build_renderer(kind: str, views: Sequence[View], runtime: Runtime, crops_per_image: int, images_per_call: int,
                   workers: int = 1, pin_memory: bool = False):
    """The renderer of ``kind`` (``"torch"`` | ``"dali"``, as ``common.loader_kind.choose_loader`` resolved it)
    for ``views``; ``workers`` threads split a torch call's images (DALI has its own threads)."""
    if kind == "torch":
        return TorchRenderer(views, workers, pin_memory)
    from common.dali_crops import DaliCropRenderer, device_id_for  # imports nvidia.dali: only when asked for

    return DaliCropRenderer(views, batch_size=images_per_call, num_threads=max(1, runtime.num_workers),
                            device_id=device_id_for(runtime), crops_per_image=crops_per_image)
