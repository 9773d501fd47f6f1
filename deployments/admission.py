"""Front-door admission: the ingress refuses a request the decoder pool could not queue (503 + Retry-After) before
reading its body, preprocessing it or calling any stage, so a refused request costs the encoder and the trimmer
nothing (GuardMiddleware takes the place: deployments/limits.py).

Each decoder replica reports how many more requests its engine would hold (`queue_room`: max_waiting less the
waiting and the ones on their way, plus the free running slots while nothing waits). A request admitted here holds a
`Place` from admission until the decoder's engine has it (the decoder's `Queued`: `Place.handed_over`) AND a report
taken after that has arrived: from then on the report counts the request (waiting, or in a running slot), so holding
the place too would count it twice. A request that fails or ends
first gives its place back then (`Place.release`, idempotent). Places are held optimistically per ingress replica,
against reports refreshed every `period_s`: a request still in the encoder or trimmer is in no report, so each
ingress replica takes at most its share of the pool's room (room / ingress replicas, rounded up). The decoder still
refuses what gets through anyway (several ingresses rounding up, a lowered max_waiting): the last line of defense,
counted here with the stage calls its requests cost."""

import asyncio
import math
import time

from ray.serve.metrics import Counter, Gauge

from .availability import Poller
from .replicas import replica_actor_names, replica_stats

STALE_S = 10.0  # a decoder replica silent for this long counts as having no room


class NoRoom(Exception):
    """The decoder pool cannot queue another request now."""


class Place:
    """One admitted request's place in the decoder pool's queue room, held by its ingress replica."""

    def __init__(self, room: "DecoderRoom"):
        self.room = room
        self.handed_at: float | None = None  # when the decoder's engine had it (monotonic)
        self.released = False

    def handed_over(self) -> None:
        """The decoder's engine has the request: the first poll that starts after now gives the place back."""
        if self.handed_at is None and not self.released:
            self.handed_at = time.monotonic()

    def release(self) -> None:
        """Give the place back (the request failed, ended, or a report counts it now); again: nothing."""
        if not self.released:
            self.released = True
            self.room.places.discard(self)
            self.room._wake()


class DecoderRoom(Poller):
    """One ingress replica's view of the decoder pool's queue room, and the places its requests hold in it."""

    def __init__(self, app: str, wait_s: float = 0.0, period_s: float = 0.25, timeout_s: float = 1.0):
        self.app, self.wait_s, self.period_s, self.timeout_s = app, wait_s, period_s, timeout_s
        self.reports: dict[str, tuple[int, float]] = {}  # decoder replica -> (queue_room, when it answered)
        self.ingresses = 1
        self.places: set[Place] = set()  # this replica's requests admitted and not yet in a report (or ended)
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
        """The pool's queue room at the last reports (None before the first, or while the pool has no replica: one
        being replaced, which requests wait for up to stage_wait_s, as they would without front-door admission)."""
        if not self.polled.is_set() or not self.reports:
            return None
        now = time.monotonic()
        return sum(room for room, at in self.reports.values() if now - at < STALE_S)

    def share(self) -> int | None:
        """Places this replica may hold: its share of the pool's room (None: no report yet, admit)."""
        room = self.room()
        return None if room is None else math.ceil(room / max(1, self.ingresses))

    async def _poll(self) -> None:
        while True:
            started = time.monotonic()
            try:
                stats, ingresses = await asyncio.gather(
                    replica_stats(self.app, "DecoderPool", self.timeout_s),
                    asyncio.to_thread(replica_actor_names, self.app, "Ingress"))
                now = time.monotonic()
                self.reports = {name: (int(s.get("queue_room", 0)), now) if s else self.reports.get(name, (0, 0.0))
                                for name, s in stats.items()}  # a late answer keeps the replica's last report
                self.ingresses = max(1, len(ingresses))
                if all(stats.values()):  # every replica's report is from this poll (a late one keeps its last)
                    self.counted_since(started)
                self.room_gauge.set(self.room() or 0)
                self.polled.set()
                self._wake()
            except Exception:  # the controller or GCS restarting: keep the last view, try again
                pass
            await asyncio.sleep(self.period_s)

    def counted_since(self, started: float) -> None:
        """Reports taken after `started` have arrived: give back the places handed over before it (the reports
        count those requests now). A place handed over STALE_S ago goes back anyway (reports that old count
        nothing)."""
        stale = time.monotonic() - STALE_S
        for place in [p for p in self.places if p.handed_at is not None and p.handed_at < max(started, stale)]:
            place.release()

    @property
    def held(self) -> int:
        return len(self.places)

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # ---- admission

    async def admit(self) -> Place:
        """Hold a place for one request, waiting up to `wait_s` for one; NoRoom when there is none. The caller
        marks it `handed_over` when the decoder's engine has the request, and `release`s it when the request fails
        or ends (whichever comes first gives it back)."""
        self.ensure_started()
        if not self.polled.is_set():  # just started: the first report is a poll away
            await _wait(self.polled, self.timeout_s + self.period_s)
        self.counted_since(-math.inf)  # the stale ones only (when the polls keep failing)
        deadline = time.monotonic() + self.wait_s
        while (share := self.share()) is not None and self.held >= share:
            left = deadline - time.monotonic()
            if left <= 0:
                self.counts["refused_at_ingress"] += 1
                self.refusals.inc(tags={"where": "ingress"})
                raise NoRoom(f"the decoder pool has no room ({self.held} of {share} places held here); "
                             "try again later")
            await _wait(self.changed, left)
        place = Place(self)
        self.places.add(place)
        self.counts["admitted"] += 1
        return place

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
