from amble.server.store.base import Store, Versioned
from amble.server.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "Versioned"]
