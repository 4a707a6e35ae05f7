"""Robustness metrics.

* robust accuracy ``RA = mean_x 1[f(A(x)) = y]`` on the evaluation sample
  (main paper eq. 8); ``ASR = 1 - RA``.
* TSR between members (EDLCM eq. 12):
  ``TSR = (1/M) sum_i sum_{j != i} 100 * (1 - acc_j(G_i(x)))``, with
  ``G_i`` PGD adversarial examples crafted on member i alone and ``acc_j``
  member j's accuracy on them. It ranges over [0, 100 (M - 1)]; higher means
  members share more adversarial directions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["accuracy", "predict", "transferability"]

Model = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: Model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    return float((predict(model, x, batch_size) == y).float().mean()) if len(y) else 0.0


def transferability(
    members: Sequence[Model], x: torch.Tensor, y: torch.Tensor, attack_factory: Callable[[Model], Callable]
) -> tuple[float, list[list[float]]]:
    """TSR (EDLCM eq. 12) and the matrix ``acc[i][j]`` of member j on examples crafted on member i."""
    m = len(members)
    acc = [[0.0] * m for _ in range(m)]
    for i, source in enumerate(members):
        x_adv = attack_factory(source)(x, y)
        for j, target in enumerate(members):
            acc[i][j] = accuracy(target, x_adv, y)
    tsr = sum(100.0 * (1.0 - acc[i][j]) for i in range(m) for j in range(m) if j != i) / m if m > 1 else 0.0
    return tsr, acc
