"""The serverless parameter server: Store, EventLog and Runtime interfaces, and the functions."""

from amble.server.events import Event, EventLog, MemoryEventLog
from amble.server.functions import ServerFunctions
from amble.server.functions import controlvariates as controlvariates
from amble.server.functions.planning import select_devices
from amble.server.paramserver import ParameterServer, Published, RoundOutcome
from amble.server.records.settings import RunSettings
from amble.server.records.state import RoundState
from amble.server.runtime import Invocation, LocalRuntime, PoolSettings, Runtime, RuntimeStats
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
    "Published",
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
