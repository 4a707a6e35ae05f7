"""What the server records of simulated cheating nodes: who cheated and how, and what a backdoor achieved.

:func:`malicious_record` is ``results.json``'s ``malicious`` entry: each
cheating node with its behaviour and every parameter (defaults filled in),
marked ``simulated``. :func:`backdoor_figures` is its ``backdoor`` entry, one
per backdoor node: the attack success rate, the fraction of held-out images
of other classes than the target that the ensemble (and each member)
classifies as the target once the node's trigger is stamped on them, with a
95% Wilson interval. The held-out images are those the clean accuracy is
measured on (the test set, or a study's validation images).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .behaviours import Backdoor, build_behaviour, malicious_nodes
from .data import to_float
from .stats import interval_of

__all__ = ["attack_success_rate", "backdoor_figures", "malicious_record"]


def malicious_record(cfg: DictConfig, num_classes: int) -> dict[str, Any] | None:
    """``results.json``'s ``malicious`` entry, or None when every node is honest."""
    cheats = malicious_nodes(OmegaConf.to_container(cfg.deployment.malicious, resolve=True))
    if not cheats:
        return None
    nodes = []
    for node, (name, options) in sorted(cheats.items()):
        b = build_behaviour(name, options, num_classes)
        nodes.append({"node": node, "behaviour": name, **dataclasses.asdict(b.config)})
    return {"simulated": True, "note": "SIMULATED cheating nodes (deployment.malicious), not an observed attack",
            "nodes": nodes}


@torch.no_grad()
def _predictions(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(to_float(x[i:i + batch]).to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def attack_success_rate(model: nn.Module, backdoor: Backdoor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """The fraction of images of ``x`` not of the target class that ``model`` classifies as the target once
    triggered, and how many such images there were."""
    keep = y != backdoor.config.target
    if not bool(keep.any()):
        return 0.0, 0
    pred = _predictions(model, backdoor.trigger.apply(x[keep]))
    return float((pred == backdoor.config.target).float().mean()), int(keep.sum())


def backdoor_figures(cfg: DictConfig, num_classes: int, ensemble: nn.Module, members: list[nn.Module],
                     member_ids: list[int], x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """One entry per backdoor node: its trigger and target, and the attack success rate of the ensemble and
    of each member on the held-out images ``x``, ``y``."""
    out = []
    cheats = malicious_nodes(OmegaConf.to_container(cfg.deployment.malicious, resolve=True))
    for node, (name, options) in sorted(cheats.items()):
        b = build_behaviour(name, options, num_classes)
        if not isinstance(b, Backdoor):
            continue
        asr, n = attack_success_rate(ensemble, b, x, y)
        per_member = {str(m): attack_success_rate(model, b, x, y)[0] for m, model in zip(member_ids, members)}
        out.append({"node": node, "target": b.config.target, "trigger": dataclasses.asdict(b.trigger),
                    "attack_success_rate": asr, "interval": interval_of(asr, n), "num_images": n,
                    "members": per_member})
    return out
