"""Models: the zoo (:mod:`.zoo`) and the ``model`` config section (:mod:`.settings`).

Every model starts with :class:`Normalize`, so it takes [0, 1] inputs;
``build_model(name, in_channels, num_classes, mean, std)`` returns a fresh
one. A name is a hand-made model (``MODEL_BUILDERS``) or a searched
architecture (``searched:PATH`` of a genotype file, or ``searched:{...}``).

The names below are imported on first use (:mod:`fedrobust.lazy`), so that
the config section's schema loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .settings import MODELS, SEARCHED_PREFIX, is_searched, read_genotype
    from .zoo import DATA_SHAPES, MODEL_BUILDERS, Normalize, build_model, count_parameters, resolve_model

__all__ = ["DATA_SHAPES", "MODELS", "MODEL_BUILDERS", "Normalize", "SEARCHED_PREFIX", "build_model", "count_parameters",
           "is_searched", "read_genotype", "resolve_model"]

__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["DATA_SHAPES", "MODEL_BUILDERS", "Normalize", "build_model", "count_parameters", "resolve_model"],
                    ".zoo"),
    **dict.fromkeys(["MODELS", "SEARCHED_PREFIX", "is_searched", "read_genotype"], ".settings"),
})
