from amble.server.events.base import Event, EventLog
from amble.server.events.memory import MemoryEventLog

__all__ = ["Event", "EventLog", "MemoryEventLog"]
