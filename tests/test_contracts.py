"""The embedded implementations against the interface contracts (Redis and Ray plug in the same way)."""

from __future__ import annotations

from amble.server.events.base import EventLog
from amble.server.events.memory import MemoryEventLog
from amble.server.runtime.base import PoolSettings, Runtime
from amble.server.runtime.local import LocalRuntime
from amble.server.store.base import Store
from amble.server.store.memory import MemoryStore
from tests.contract.events_contract import EventLogContract
from tests.contract.runtime_contract import HandlersFor, RuntimeContract
from tests.contract.store_contract import StoreContract


class TestMemoryStore(StoreContract):
    def make(self) -> Store:
        return MemoryStore()


class TestMemoryEventLog(EventLogContract):
    def make(self) -> EventLog:
        return MemoryEventLog()


class TestLocalRuntime(RuntimeContract):
    def make(self, store: Store, events: EventLog, handlers_for: HandlersFor, settings: PoolSettings) -> Runtime:
        return LocalRuntime(store, events, handlers_for(store), settings)
