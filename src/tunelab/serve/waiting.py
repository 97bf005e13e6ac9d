"""Requests waiting for a batch slot: bounded (beyond `maxsize`, 429) and grouped by client.

Admission is max-min fair across clients: a free slot goes to the waiting client that holds the fewest slots,
oldest request first among equals. One client alone may fill the batch (no slot idles), but as soon as another
client waits, every slot that frees goes to whoever holds fewer, so no client keeps more than its share once the
rows it already runs finish (running rows are never preempted).

A client is (peer address, `user`): OpenAI's end-user id names the people behind one gateway, but any caller may
put anything there, so fairness is across peer addresses first and across the users of a peer second. A flood
from one address under a thousand invented user ids still gets one address's share.

The room is shared the same way: when it is full, a request from a peer holding fewer places than the peer
holding the most pushes that peer's heaviest user's newest request out (it gets the 429 instead); within one
peer, a user holding fewer places pushes out the newest of the user holding the most. One client alone may fill
the room, but a flood from one client cannot keep everyone else out of it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from typing import Any


class WaitingRoom:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._by_client: dict[str, deque[Any]] = {}
        self._count = 0
        self._changed = threading.Condition()

    def qsize(self) -> int:
        return self._count

    def put_nowait(self, request: Any) -> Any:
        """Queue `request` (it has `.client` and an increasing `.id`). In a full room: the request it pushed out
        (the newest of the client holding the most places, when that is more than this client's next one), or
        queue.Full when it has no fairer claim than those waiting."""
        with self._changed:
            pushed_out = None
            if self._count >= self.maxsize:
                victim = self._heavier_than(request.client)
                if victim is None:
                    raise queue.Full
                pushed_out = self._by_client[victim].pop()
                if not self._by_client[victim]:  # one of many users of a heavy peer: it held one place
                    del self._by_client[victim]
                self._count -= 1
            self._by_client.setdefault(request.client, deque()).append(request)
            self._count += 1
            self._changed.notify_all()
            return pushed_out

    def _heavier_than(self, client: Any) -> Any:
        """The client whose newest place goes to `client` in a full room, or None when `client` has no fairer
        claim: the heaviest user of the heaviest peer, if that peer holds more than `client`'s peer will with it;
        within `client`'s own peer, the heaviest user, if it holds more than `client` will."""
        places = Counter({c: len(q) for c, q in self._by_client.items()})
        by_peer: Counter[Any] = Counter()
        for c, n in places.items():
            by_peer[peer_of(c)] += n
        mine = peer_of(client)
        heaviest = max(by_peer, key=lambda p: by_peer[p], default=None)
        if heaviest is None:
            return None
        if heaviest != mine:
            if by_peer[heaviest] <= by_peer[mine] + 1:
                return None
        users = [c for c in places if peer_of(c) == heaviest]
        victim = max(users, key=lambda c: places[c])
        if heaviest == mine and places[victim] <= places[client] + 1:
            return None
        return victim

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something waits (True) or `timeout` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count > 0, timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The oldest request of the client holding nothing yet this round (static batching: plain FIFO order
        across clients); queue.Empty after `timeout`."""
        taken = self.take(1, Counter(), timeout)
        if not taken:
            raise queue.Empty
        return taken[0]

    def take(self, slots: int, holding: Counter[Any], timeout: float | None = 0.0) -> list[Any]:
        """Up to `slots` requests, each to the waiting client whose peer, then whose own client, holds the
        fewest slots in `holding` (updated)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._count == 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._changed.wait(left)
            peers: Counter[Any] = Counter()
            for c, n in holding.items():
                peers[peer_of(c)] += n
            taken = []
            while slots > len(taken) and self._count:
                client = min(self._by_client,
                             key=lambda c: (peers[peer_of(c)], holding[c], self._by_client[c][0].id))
                taken.append(self._by_client[client].popleft())
                if not self._by_client[client]:
                    del self._by_client[client]
                holding[client] += 1
                peers[peer_of(client)] += 1
                self._count -= 1
            return taken


def peer_of(client: Any) -> Any:
    """The peer part of a client: (peer, user) -> peer; a plain name is its own peer."""
    return client[0] if isinstance(client, tuple) else client
