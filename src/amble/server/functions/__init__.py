"""The parameter server's functions: stateless handlers, each triggered by one event.

``common.py`` holds what they share (cached reads, the one exactly-once fold, the one publish),
``planning.py`` the selection and the strategy's plans, ``rounds.py`` the synchronous rounds,
``buffered.py`` FedBuff's buffers, ``controlvariates.py`` SCAFFOLD's state.
"""

from __future__ import annotations

from amble.server.functions.buffered import BufferedFunctions
from amble.server.functions.rounds import RoundFunctions
from amble.server.runtime.base import Handler
from amble.strategies.fedbuff import is_asynchronous


class ServerFunctions(RoundFunctions):
    """A strategy's functions: its rounds', or, for an asynchronous strategy, the buffered ones."""

    def handlers(self) -> dict[str, Handler]:
        if is_asynchronous(type(self.strategy)):
            return BufferedFunctions(self.store, self.strategy).handlers()
        return super().handlers()


__all__ = ["BufferedFunctions", "RoundFunctions", "ServerFunctions"]
