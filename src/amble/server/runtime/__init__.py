from amble.server.runtime.base import (
    FUNCTIONS_GROUP,
    FUNCTIONS_TOPIC,
    Handler,
    Invocation,
    PoolSettings,
    Runtime,
    RuntimeStats,
)
from amble.server.runtime.local import LocalRuntime

__all__ = [
    "FUNCTIONS_GROUP",
    "FUNCTIONS_TOPIC",
    "Handler",
    "Invocation",
    "LocalRuntime",
    "PoolSettings",
    "Runtime",
    "RuntimeStats",
]
