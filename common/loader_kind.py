"""Which crop-rendering path a stage uses: the one rule behind ``loader = "auto" | "dali" | "torch"``.

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

from typing import TYPE_CHECKING

from common.config import LOADERS, ConfigError

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
