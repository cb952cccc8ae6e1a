"""FedOpt baselines (Reddi et al. 2021): FedAvg's planning with a server optimizer on its aggregate.

``fedavgm`` steps the model with server momentum (Hsu et al. 2019), ``fedadam`` with Adam; their
settings and defaults are in :mod:`amble.strategies.serveropt`. Any strategy can take either with a
``server_optimizer`` entry key; an entry's own ``server_optimizer`` wins over these defaults.
"""

from __future__ import annotations

from amble.strategies.fedavg import FedAvg
from amble.strategies.serveropt import ServerOptimizerSettings


class FedAvgM(FedAvg):
    """FedAvg with server momentum: ``m = beta1 m + g``, ``x' = x - lr m`` (lr 1, beta1 0.9)."""

    name = "fedavgm"
    server_optimizer = ServerOptimizerSettings(kind="momentum")


class FedAdam(FedAvg):
    """FedAvg with Adam on the server (Reddi's variant, no bias correction; lr 10^-1.5, tau 1e-3)."""

    name = "fedadam"
    server_optimizer = ServerOptimizerSettings(kind="adam")
