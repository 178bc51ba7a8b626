"""A lock of the session store held under a lease: renewed while held, and its token fences writes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .store import SessionStore

logger = logging.getLogger("chatstream.session")


class Lease:
    """The lock ``name`` of ``store``, renewed every ``lease_s / 3`` while held.

    A holder that dies frees it within ``lease_s``. If a renewal finds the lease gone (the holder
    stalled) or the store keeps failing for ``lease_s``, ``on_lost`` is called once with
    ``"expired"`` or ``"store_unavailable"``: the store refuses the holder's fenced writes from then on.
    """

    def __init__(self, store: SessionStore, name: str, lease_s: float,
                 on_lost: Callable[[str], None] | None = None, max_in_session: int | None = None) -> None:
        self.store = store
        self.name = name
        self.lease_s = lease_s
        self.on_lost = on_lost
        self.max_in_session = max_in_session  # see SessionStore.acquire_lock
        self.token: str | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def acquire(self) -> bool:
        """Take the lock; False while another holder has an unexpired lease (SessionBusy past ``max_in_session``)."""
        if self.token is not None:
            return False  # not re-entrant
        taking = asyncio.ensure_future(
            self.store.acquire_lock(self.name, self.lease_s) if self.max_in_session is None else
            self.store.acquire_lock(self.name, self.lease_s, max_in_session=self.max_in_session))
        try:
            # Shielded: the store may take the lock after all when this request is cancelled
            # meanwhile (its thread or server carries on); unreleased, that lock would refuse the
            # session's next requests for the whole lease (a turn's index update was lost so).
            token = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(self._give_back)
            raise
        if token is None:
            return False
        self.token = token
        self._keeper = asyncio.get_running_loop().create_task(self._keep(token))
        return True

    async def release(self) -> None:
        token, keeper = self.token, self._keeper
        self.token = self._keeper = None
        if keeper is not None:
            keeper.cancel()
        if token is not None:
            try:
                # Shielded: a request cancelled while releasing still releases.
                await asyncio.shield(self.store.release_lock(self.name, token))
            except Exception as exc:  # the store is down: the lease frees the lock when it runs out
                logger.warning("releasing the lock %s… failed (%s); it frees itself within %g s",
                               self.name[:8], exc, self.lease_s)

    def _give_back(self, taking: asyncio.Future[str | None]) -> None:
        """Release a lock taken for a request that was cancelled while waiting for it."""
        if taking.cancelled() or taking.exception() is not None or taking.result() is None:
            return
        release = asyncio.get_running_loop().create_task(self.store.release_lock(self.name, taking.result() or ""))
        _releasing.add(release)  # a task nobody awaits must be referenced until it is done
        release.add_done_callback(_released)

    async def _keep(self, token: str) -> None:
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.lease_s / 3)
            reason = "expired"
            try:
                if await self.store.refresh_lock(self.name, token, self.lease_s):
                    renewed = time.monotonic()
                    continue
            except Exception:
                if time.monotonic() - renewed < self.lease_s:
                    logger.exception("renewing the lock %s… failed; retrying", self.name[:8])
                    continue
                reason = "store_unavailable"
            # The lease ran out (a stall, or the store was unreachable for longer than the lease):
            # another request may hold the lock now, and the store refuses this holder's writes.
            logger.warning("lock %s… lost: the lease ran out before it was renewed", self.name[:8])
            if self.on_lost is not None:
                self.on_lost(reason)
            return


_releasing: set[asyncio.Task[None]] = set()


def _released(release: asyncio.Task[None]) -> None:
    _releasing.discard(release)
    if not release.cancelled() and release.exception() is not None:  # the lease frees it when it runs out
        logger.warning("releasing a lock taken for a cancelled request failed: %s", release.exception())
