"""The serverless parameter server: Store, EventLog and Runtime interfaces, and the functions."""

from amble.server.events import Event, EventLog, MemoryEventLog
from amble.server.functions import RunSettings, ServerFunctions, select_devices
from amble.server.paramserver import ParameterServer, RoundOutcome
from amble.server.runtime import Invocation, LocalRuntime, PoolSettings, Runtime, RuntimeStats
from amble.server.state import RoundState
from amble.server.store import MemoryStore, Store, Versioned

__all__ = [
    "Event",
    "EventLog",
    "Invocation",
    "LocalRuntime",
    "MemoryEventLog",
    "MemoryStore",
    "ParameterServer",
    "PoolSettings",
    "RoundOutcome",
    "RoundState",
    "RunSettings",
    "Runtime",
    "RuntimeStats",
    "ServerFunctions",
    "Store",
    "Versioned",
    "select_devices",
]
