"""The simulation driver: rounds on a virtual clock through the parameter server."""

from amble.server.factory import build_embedded_server
from amble.sim.driver import Experiment, run_experiment
from amble.strategies.registry import build_strategy

__all__ = ["Experiment", "build_embedded_server", "build_strategy", "run_experiment"]
