"""The decoder pool's KV pressure as the ingress reads it for elastic trimming (docs/elastic.md)."""

import asyncio
import time


class PoolPressure:
    """The decoder pool's KV pressure for elastic trimming (docs/elastic.md), read through the pool's handle (so from
    the replica the KV-budget router ranks first: the one the request will most likely land on) at most every
    `period_s`; concurrent readers share one call. A pool that does not answer reads as full (the floor)."""

    def __init__(self, decoder, period_s: float = 0.25, timeout_s: float = 2.0):
        self.decoder, self.period_s, self.timeout_s = decoder, period_s, timeout_s
        self.value, self.at, self.call = 0.0, float("-inf"), None

    async def read(self) -> float:
        if time.monotonic() - self.at < self.period_s:
            return self.value
        if self.call is None:
            self.call = asyncio.ensure_future(self._fetch())
        call = self.call
        try:
            return await asyncio.shield(call)
        finally:
            if self.call is call and call.done():
                self.call = None

    async def _fetch(self) -> float:
        try:
            self.value = float(await asyncio.wait_for(self.decoder.pressure.remote(), self.timeout_s))
        except Exception:  # noqa: BLE001 - no answer: assume the worst, never fail the request for it
            self.value = 1.0
        self.at = time.monotonic()
        return self.value

