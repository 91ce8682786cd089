"""MEAL V2's output discriminator: a 3-layer MLP on class-probability vectors.

The original (szq0214/MEAL-V2, ``models/discriminator.py``) is three 1x1
convolutions over a ``[B, K, 1, 1]`` view of the outputs, i.e. three linear
layers, with a reduction factor of 8 per layer: 1000 -> 125 -> 15 -> 2. It
emits two logits per sample (``[1, 0]`` = student, ``[0, 1]`` = teacher) that
are scored with BCE-with-logits.

Two deliberate differences, both documented where they matter:

* Hidden widths are ``max(width // 8, 2)`` so that small class counts
  (10 classes -> 2 -> 2 -> 2) still give a working network; for 1000 classes
  the sizes are exactly the original's.
* The original also applies a ReLU to the *final* layer, so its "logits" are
  never negative and BCE-with-logits can never push a probability below 0.5.
  That clamps half of the loss surface away; here the last layer is linear,
  as BCE-with-logits expects. The recipes of the released models do not
  restore it either: no switch is offered (why: docs/recipes.md).

The input is probabilities (the student's softmax and the cached ensemble
target). The original fed raw logits because it had the teachers' logits at
hand; the cache stores probabilities only, so both sides are compared in the
same (probability) space.
"""
from __future__ import annotations

from torch import nn

REDUCTION = 8  # MEAL V2's K: each hidden layer is 1/8 of the previous one


def hidden_sizes(num_classes: int, reduction: int = REDUCTION) -> tuple[int, int]:
    """(h1, h2): 1000 classes -> (125, 15), as in the original; never below 2."""
    h1 = max(num_classes // reduction, 2)
    h2 = max(h1 // reduction, 2)
    return h1, h2


class Discriminator(nn.Module):
    """K -> K/8 -> K/64 -> 2 with ReLU between the layers; outputs two logits."""

    def __init__(self, num_classes: int, reduction: int = REDUCTION):
        super().__init__()
        h1, h2 = hidden_sizes(num_classes, reduction)
        self.net = nn.Sequential(
            nn.Linear(num_classes, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, 2),
        )

    def forward(self, probs):
        return self.net(probs)
