"""fedrobust: robust federated ensembles.

Flower clients train ensemble members on their own shards; the server
assembles them into a :class:`LogitAverageEnsemble`.
"""

from .ensemble import InvalidUpdateError, LogitAverageEnsemble
from .run import load_ensemble
from .training import train_member

__all__ = ["InvalidUpdateError", "LogitAverageEnsemble", "load_ensemble", "train_member"]
__version__ = "0.1.0"
