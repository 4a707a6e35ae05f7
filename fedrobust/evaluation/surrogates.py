"""The surrogate zoo for transfer attacks.

Surrogates are trained with the project's own member-training function
(:func:`fedrobust.training.train_member`) on the full training set (80/20
train/validation split with the default partition seed), with the default
hyperparameters of the schema (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128,
cosine over ``attack.surrogate_epochs``), whatever the target run used: the
attacker's models do not depend on the defender's choices.

The digits zoo is made of models sized for 8x8 images (a small CNN, a
ResNet-8, a VGG-7 and an MLP: four families, several depths and widths), so
it trains in seconds; CIFAR-sized ResNet-18 and VGG-16 cost minutes on 8x8
inputs and transferred no better (CWA at eps 0.1 on the demo ensemble: 0.817
against 0.833). The 28x28 zoo (MNIST, Fashion-MNIST) is a two-convolution
network, LeNet-5, a ResNet-8 and the MLP, trained for 1 epoch
(``attack=fashion_mnist``, ``attack=mnist``: of 1, 2, 3 and 5 epochs, 1 was
the cheapest and transferred best or within a point of the best,
``benchmarks/bench_zoo.py``). The CIFAR zoo is the papers' (ResNet-18/34, VGG-16,
MobileNetV2).

A surrogate may be a searched architecture (``searched:PATH`` of a genotype
file): the zoo's key holds the genotype itself, not its path, so an edited
file is a new zoo and a moved one is the same.

The zoo is cached by content (dataset fingerprint, architectures, settings,
seeds), so a second evaluation on the same data trains nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from strategies import Plain

from ..data_settings import DataConfig
from ..deployment_settings import DeploymentConfig
from ..training_settings import OptimizerConfig, TrainConfig
from ..data import ImageDataset
from ..ensemble import LogitAverageEnsemble
from ..models.settings import is_searched
from ..models import build_model, resolve_model
from ..partition import node_shards
from ..training import TrainSettings, member_seed, train_member
from ..runs.cache import cache_root, content_key, load_tensors, save_tensors, tensor_fingerprint

__all__ = ["DEFAULT_ZOOS", "default_surrogates", "load_or_train_zoo", "zoo_cache_path", "zoo_key"]

log = logging.getLogger("fedrobust")

DEFAULT_ZOOS = {
    # four families, depths 3 to 8, widths 16 to 256, all sized for 8x8 inputs: about 16 s to train on 2 cores
    "digits": ["cnn", "resnet8", "vgg7", "mlp"],
    # four families for 28x28 grey images (two CNNs with 5x5 and 3x3 kernels, a ResNet, an MLP)
    "mnist": ["convnet", "lenet", "resnet8", "mlp"],
    "fashion_mnist": ["convnet", "lenet", "resnet8", "mlp"],
    "cifar10": ["resnet18", "resnet34", "vgg16", "mobilenetv2"],
    "cifar100": ["resnet18", "resnet34", "vgg16", "mobilenetv2"],
}


def default_surrogates(cfg: DictConfig) -> list[str]:
    return list(cfg.attack.surrogates) if cfg.attack.surrogates is not None else DEFAULT_ZOOS[cfg.data.name]


def _settings(cfg: DictConfig) -> TrainSettings:
    opt, train, data = OptimizerConfig(), TrainConfig(), DataConfig()
    return TrainSettings(
        lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
        epochs=cfg.attack.surrogate_epochs, batch_size=train.batch_size, patience=train.patience,
        augment=cfg.data.augment, crop_padding=data.crop_padding,
    )


def zoo_cache_path(cfg: DictConfig, key: str) -> Path:
    """The cache file of the zoo with content key ``key`` (which may not exist yet)."""
    return cache_root(cfg.attack.cache_dir) / "surrogates" / f"{key}.pt"


def _slot(i: int, arch: str) -> str:
    """Surrogate ``i``'s prefix in the cache file: a searched one's is the same whatever its file is called."""
    return f"{i}.searched." if is_searched(arch) else f"{i}.{arch}."


def zoo_key(cfg: DictConfig, data: ImageDataset, specs: list[str] | None = None) -> str:
    """The zoo's content key: data, architectures (a searched one by its genotype), settings and seeds.
    ``specs``: the surrogates as :func:`~fedrobust.models.resolve_model` gives them (read here if None)."""
    if specs is None:
        specs = [resolve_model(a) for a in default_surrogates(cfg)]
    return content_key({
        "kind": "surrogate-zoo", "data": data.name, "data_fp": tensor_fingerprint(data.x_train, data.y_train),
        "archs": specs, "settings": dataclasses.asdict(_settings(cfg)), "seed": cfg.attack.surrogate_seed,
        "split_seed": DeploymentConfig().partition_seed, "val_fraction": DataConfig().val_fraction,
    })


def load_or_train_zoo(cfg: DictConfig, data: ImageDataset, device: torch.device) -> tuple[LogitAverageEnsemble, str, bool]:
    """The surrogate ensemble, its cache key, and whether it came from the cache."""
    archs = default_surrogates(cfg)
    specs = [resolve_model(a) for a in archs]  # a searched surrogate's genotype, read once
    settings = _settings(cfg)
    split_seed = DeploymentConfig().partition_seed
    key = zoo_key(cfg, data, specs)
    path = zoo_cache_path(cfg, key)
    cached = load_tensors(path)
    models: list[nn.Module] = []
    if cached is not None:
        for i, (arch, spec) in enumerate(zip(archs, specs)):
            model = build_model(spec, data.in_channels, data.num_classes, data.mean, data.std)
            prefix = _slot(i, arch)
            model.load_state_dict({k[len(prefix):]: v for k, v in cached.items() if k.startswith(prefix)})
            models.append(model)
        log.info("surrogates: reused cached zoo %s (%s)", key, ", ".join(archs))
        return LogitAverageEnsemble(models).to(device), key, True

    (shard,) = node_shards(data.y_train.numpy(), "centralized", 1, 0.9, split_seed, DataConfig().val_fraction)
    xt, yt = data.x_train[shard.train], data.y_train[shard.train]
    xv, yv = data.x_train[shard.val], data.y_train[shard.val]
    state: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for i, (arch, spec) in enumerate(zip(archs, specs)):
        seed = member_seed(cfg.attack.surrogate_seed, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(spec, data.in_channels, data.num_classes, data.mean, data.std)
        weights, _ = train_member(model, xt, yt, xv, yv, Plain(), settings, seed, device=device,
                                  progress=cfg.train.progress, desc=f"surrogate {i} {arch}")
        model.load_state_dict(weights)
        models.append(model)
        state |= {f"{_slot(i, arch)}{k}": v for k, v in weights.items()}
    save_tensors(path, state, {"archs": archs, "settings": dataclasses.asdict(settings), "data": data.name})
    log.info("surrogates: trained zoo %s (%s) in %.1fs; cached at %s", key, ", ".join(archs), time.perf_counter() - t0, path)
    return LogitAverageEnsemble(models).to(device), key, False
