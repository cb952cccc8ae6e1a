"""Work that must run one batch at a time, taken by whichever waiting caller gets the turn first.

The gateway's request threads each bring one upload; the parameter server must fold them one pass
at a time (the embedded runtime runs functions in the caller's thread, and is not thread-safe).
Instead of a dedicated thread, the caller that gets the turn runs everything waiting, its own
included, in one pass ("flat combining"); the others find their results done when their turn comes
and return at once. So a burst of uploads is folded in a few passes, each paying once for what does
not depend on how many it holds (running the functions, reading the round's record, waking the
round loop), and never more than one pass runs at a time.

Items with the same key are never in one pass: the second waits for the first's result, so a device
that sent the same upload twice has them decided in order, as if they had come one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Ticket(Generic[Item, Result]):
    item: Item
    result: Result | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class Batcher(Generic[Item, Result]):
    """Runs ``run`` on batches of submitted items, one batch at a time, under ``turn``.

    ``run`` gets the batch and returns one result per item, in order; an item's result may be an
    exception, which its submitter gets raised. If ``run`` itself raises, every item of its batch
    gets that exception. ``turn`` is held while a batch runs: whoever else needs what ``run`` uses
    (the round loop, to start or close a round) takes it too.
    """

    run: Callable[[Sequence[Item]], Sequence[Result | BaseException]]
    key: Callable[[Item], Hashable]
    turn: threading.Lock | threading.RLock
    max_batch: int = 64
    """At most this many items in one pass, so the first of them is not held up long by the rest."""
    _waiting: list[_Ticket[Item, Result]] = field(default_factory=list)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, item: Item) -> Result:
        """Run ``item`` in the next batch it fits in (perhaps by this thread) and return its result."""
        ticket: _Ticket[Item, Result] = _Ticket(item)
        with self._mutex:
            self._waiting.append(ticket)
        while not ticket.done:
            with self.turn:
                if not ticket.done:
                    self._run_batch(self._take())
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]  # done without an error: a Result

    def pending(self) -> int:
        """Items submitted and not yet taken into a pass."""
        with self._mutex:
            return len(self._waiting)

    def _take(self) -> list[_Ticket[Item, Result]]:
        """The waiting tickets for one pass, oldest first: at most ``max_batch``, one per key."""
        with self._mutex:
            batch: list[_Ticket[Item, Result]] = []
            keys: set[Hashable] = set()
            for ticket in self._waiting:
                key = self.key(ticket.item)
                if key not in keys and len(batch) < self.max_batch:
                    batch.append(ticket)
                    keys.add(key)
            taken = {id(t) for t in batch}
            self._waiting = [t for t in self._waiting if id(t) not in taken]
            return batch

    def _run_batch(self, batch: list[_Ticket[Item, Result]]) -> None:
        escaped: BaseException | None = None
        try:
            results = self.run([t.item for t in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except Exception as exc:  # every item of the pass fails with it; the submitters re-raise it
            results = [exc] * len(batch)
        except BaseException as exc:  # an interrupt: the pass's submitters get it too, and it goes on up
            results, escaped = [exc] * len(batch), exc
        for ticket, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                ticket.error = result
            else:
                ticket.result = result
            ticket.done = True
        if escaped is not None:
            raise escaped
