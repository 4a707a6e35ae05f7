"""A trained run's members: their checkpoints, their digest, the ensemble they make.

The run directory's side that everything reading a finished run shares
(evaluation, the loss and architecture searches, a study's trials): which
member files a run holds, in member order; one digest of their bytes (the
key under which an evaluation, a loss search or a held-out table is kept);
each checkpoint loaded as plain tensors (``weights_only=True``) and checked
against the model before it joins an ensemble.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import dataset_of
from ..ensemble import Ensemble
from ..errors import ConfigError
from ..node import build_member

__all__ = ["INCOMPLETE", "CheckpointError", "check_complete", "ensemble_rule", "load_ensemble", "load_member",
           "member_files", "member_numbers", "members_digest"]

# the mark of a run directory whose training has not finished (interrupted, failed or still running)
INCOMPLETE = "INCOMPLETE"


def check_complete(run_dir: Path) -> None:
    """Refuse a run directory whose training did not finish."""
    if (run_dir / INCOMPLETE).is_file():
        raise ConfigError(f"run_dir: {run_dir} holds an interrupted or failed training run (marked {INCOMPLETE}); "
                          "train it again in a new run_dir")


class CheckpointError(ConfigError):
    """A member checkpoint that is not one (corrupt, a pickled object, or weights of another model)."""


def load_member(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load the member checkpoint at ``path`` into ``model``: plain tensors only, checked against the model."""
    from ..ensemble import InvalidUpdateError, validate_member_weights

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message advises weights_only=False: never pass it on
        raise CheckpointError(f"{path}: not a valid member checkpoint (it does not load as plain tensors: "
                              f"{type(exc).__name__}); replace it with a file written by fedrobust train") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a valid member checkpoint (it holds a {type(state).__name__}, "
                              "not a state dict of tensors)")
    try:
        weights = validate_member_weights(state, model.state_dict(), str(path))
    except InvalidUpdateError as exc:
        raise CheckpointError(str(exc).replace("rejected update", "not a valid member checkpoint", 1)) from None
    model.load_state_dict(weights)
    return model


def load_ensemble(
    run_dir: str | Path, device: torch.device | str = "cpu", cfg: DictConfig | None = None
) -> Ensemble:
    """Rebuild a run's ensemble from its member checkpoints (and its config, unless ``cfg`` is given), combined
    as ``ensemble.combine`` says (the mean of the logits for a run that predates the setting). Members the
    server's screening rejected are not among them (they are under ``rejected/``).

    A checkpoint that is not a valid member raises :class:`CheckpointError`, naming the file.
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else OmegaConf.load(run_dir / "config.yaml")
    data = dataset_of(cfg)
    members = [load_member(path, build_member(cfg, data)) for path in member_files(run_dir)]
    combine, trim = ensemble_rule(cfg)
    return Ensemble(members, combine=combine, trim=trim).to(device)


def ensemble_rule(cfg: DictConfig) -> tuple[str, int]:
    """How a run's members combine: ``ensemble.combine`` and ``ensemble.trim`` (the mean of the logits for a
    run whose config predates the setting)."""
    rule = cfg.get("ensemble") or {}
    return rule.get("combine", "mean_logits"), rule.get("trim", 1)


def member_files(run_dir: Path) -> list[Path]:
    """``members/member_M.pt`` in member order."""
    def number(p: Path) -> int:
        try:
            return int(p.stem.split("_")[1])
        except ValueError:
            raise CheckpointError(f"{p}: not a member checkpoint name (expected member_<number>.pt)") from None

    return sorted((Path(run_dir) / "members").glob("member_*.pt"), key=number)


def member_numbers(run_dir: Path) -> list[int]:
    """The member numbers of ``members/``, in member order (a screened run's need not be 0..M-1)."""
    return [int(p.stem.split("_")[1]) for p in member_files(run_dir)]


def members_digest(run_dir: Path) -> str:
    """SHA-256 of the member checkpoints, names and bytes, in member order: what a figure of the run depends on."""
    h = hashlib.sha256()
    for path in member_files(run_dir):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()
