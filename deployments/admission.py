"""Front-door admission: the ingress refuses a request the decoder pool could not queue (503 + Retry-After) before
preprocessing it or calling any stage, so a refused request costs the encoder and the trimmer nothing.

Each decoder replica reports how many more requests its engine would queue (`queue_room`: max_waiting less the
waiting and the ones on their way). A request admitted here holds a place from admission until its first output (or
its failure): by then it has left the decoder's queue for good (preempted sequences are swapped, never re-queued), so
its place is given back. Places are held optimistically per ingress replica, against reports refreshed every
`period_s`: a request still in the encoder or trimmer is in no report, so each ingress replica takes at most its share
of the pool's room (room / ingress replicas, rounded up); a report that is late only counts requests that have since
left the queue. The decoder still refuses what gets through anyway (several ingresses rounding up, a lowered
max_waiting): the last line of defense, counted here with the stage calls its requests cost."""

import asyncio
import math
import time

from ray.serve.metrics import Counter, Gauge

from .availability import Poller
from .replicas import replica_actor_names, replica_stats

STALE_S = 10.0  # a decoder replica silent for this long counts as having no room


class NoRoom(Exception):
    """The decoder pool cannot queue another request now."""


class DecoderRoom(Poller):
    """One ingress replica's view of the decoder pool's queue room, and the places its requests hold in it."""

    def __init__(self, app: str, wait_s: float = 0.0, period_s: float = 0.25, timeout_s: float = 1.0):
        self.app, self.wait_s, self.period_s, self.timeout_s = app, wait_s, period_s, timeout_s
        self.reports: dict[str, tuple[int, float]] = {}  # decoder replica -> (queue_room, when it answered)
        self.ingresses = 1
        self.held = 0  # this replica's requests admitted and not yet at their first output
        self.counts = {"admitted": 0, "refused_at_ingress": 0, "refused_at_decoder": 0,
                       "stage_calls_for_refused": 0}
        self.polled = asyncio.Event()  # set once a poll has answered
        self.changed = asyncio.Event()  # a report or a released place: waiters look again
        self.refusals = Counter("crosstrim_admission_refusals", tag_keys=("where",),
                                description="Requests refused for want of decoder room, at the ingress (before any "
                                            "stage call) or by the decoder (after the stages ran)")
        self.refused_stage_calls = Counter("crosstrim_refused_stage_calls",
                                           description="Encoder and trimmer calls made for requests then refused")
        self.room_gauge = Gauge("crosstrim_admission_room", description="Decoder queue room this ingress sees")

    # ---- the view

    def room(self) -> int | None:
        """The pool's queue room at the last reports (None before the first)."""
        if not self.polled.is_set():
            return None
        now = time.monotonic()
        return sum(room for room, at in self.reports.values() if now - at < STALE_S)

    def share(self) -> int | None:
        """Places this replica may hold: its share of the pool's room (None: no report yet, admit)."""
        room = self.room()
        return None if room is None else math.ceil(room / max(1, self.ingresses))

    async def _poll(self) -> None:
        while True:
            try:
                stats, ingresses = await asyncio.gather(
                    replica_stats(self.app, "DecoderPool", self.timeout_s),
                    asyncio.to_thread(replica_actor_names, self.app, "Ingress"))
                now = time.monotonic()
                self.reports = {name: (int(s.get("queue_room", 0)), now) if s else self.reports.get(name, (0, 0.0))
                                for name, s in stats.items()}  # a late answer keeps the replica's last report
                self.ingresses = max(1, len(ingresses))
                self.room_gauge.set(self.room() or 0)
                self.polled.set()
                self._wake()
            except Exception:  # the controller or GCS restarting: keep the last view, try again
                pass
            await asyncio.sleep(self.period_s)

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # ---- admission

    async def admit(self) -> None:
        """Hold a place for one request, waiting up to `wait_s` for one; NoRoom when there is none. The caller
        releases it (`release`) at the request's first output or failure."""
        self.ensure_started()
        if not self.polled.is_set():  # just started: the first report is a poll away
            await _wait(self.polled, self.timeout_s + self.period_s)
        deadline = time.monotonic() + self.wait_s
        while (share := self.share()) is not None and self.held >= share:
            left = deadline - time.monotonic()
            if left <= 0:
                self.counts["refused_at_ingress"] += 1
                self.refusals.inc(tags={"where": "ingress"})
                raise NoRoom(f"the decoder pool has no room ({self.held} of {share} places held here); "
                             "try again later")
            await _wait(self.changed, left)
        self.held += 1
        self.counts["admitted"] += 1

    def release(self) -> None:
        self.held -= 1
        self._wake()

    def refused_by_decoder(self, stage_calls: int) -> None:
        """A request admitted here that the decoder refused after `stage_calls` encoder/trimmer calls."""
        self.counts["refused_at_decoder"] += 1
        self.counts["stage_calls_for_refused"] += stage_calls
        self.refusals.inc(tags={"where": "decoder"})
        if stage_calls:
            self.refused_stage_calls.inc(stage_calls)

    def report(self) -> dict:
        """For /stats: this ingress replica's admission counts and view."""
        refused = self.counts["refused_at_ingress"] + self.counts["refused_at_decoder"]
        return {**self.counts, "stage_calls_per_refused": self.counts["stage_calls_for_refused"] / max(1, refused),
                "room": self.room(), "share": self.share(), "held": self.held, "ingress_replicas": self.ingresses,
                "wait_s": self.wait_s}


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` has passed."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except asyncio.TimeoutError:
        pass
