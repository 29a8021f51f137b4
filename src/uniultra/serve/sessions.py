"""Per-client image caches of `uniultra serve`, with a bound per client and one for the server.

Each client (a browser's session cookie, else its address; set by `guard.Guard`) sees only the
images it uploaded, and its own uploads evict only its own least recently used images, so one
busy client cannot push another's images out. A server-wide bound caps memory whatever the
number of clients: past it, the least recently used image of any client goes.

The session is read from a context variable that the middleware sets for each request (and
that FastAPI carries into the worker thread of a sync endpoint), so the endpoints use the cache
without passing the session around.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter, OrderedDict
from contextvars import ContextVar
from typing import Any

from fastapi import HTTPException

SESSION_COOKIE = "uniultra_session"
current_session: ContextVar[str] = ContextVar("uniultra_session", default="default")


class SessionCache:
    """Bounded LRU of encoded images keyed by random ids, partitioned by the current session."""

    def __init__(self, capacity: int, total_capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache size must be at least 1, got {capacity}")
        if total_capacity < capacity:
            raise ValueError(f"total cache size ({total_capacity}) must be at least the per-client size ({capacity})")
        self.capacity, self.total_capacity = capacity, total_capacity
        self._items: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # id -> (session, entry), oldest first
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Images cached for the current session."""
        with self._lock:
            return self._counts[current_session.get()]

    def total(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, entry: Any) -> str:
        session, image_id = current_session.get(), secrets.token_urlsafe(12)
        with self._lock:
            self._items[image_id] = (session, entry)
            self._counts[session] += 1
            if self._counts[session] > self.capacity:
                self._drop(next(i for i, (s, _) in self._items.items() if s == session))
            while len(self._items) > self.total_capacity:
                self._drop(next(iter(self._items)))
        return image_id

    def get(self, image_id: str) -> Any:
        with self._lock:
            item = self._items.get(image_id)
            # Another client's id answers like an unknown one: ids are not shared between clients.
            if item is None or item[0] != current_session.get():
                raise HTTPException(404, f"unknown image id {image_id!r}: upload the image again (the server keeps "
                                         f"the last {self.capacity} images of each client)")
            self._items.move_to_end(image_id)
            return item[1]

    def remove(self, image_id: str) -> None:
        self.get(image_id)  # 404 for an unknown id or another client's
        with self._lock:
            if image_id in self._items:
                self._drop(image_id)

    def _drop(self, image_id: str) -> None:
        session, _ = self._items.pop(image_id)
        self._counts[session] -= 1
        if not self._counts[session]:
            del self._counts[session]  # no empty sessions kept: memory is bounded by the images
