"""Which pipeline stages have a running replica, as the Serve controller sees it: the ingress answers 503 at once
(and ends a request still waiting for its first token) when a stage it needs has none, e.g. after its node died,
instead of letting Serve queue the request until a replica comes back."""

import asyncio
import time

from ray import serve

STAGES = ("VisionEncoder", "Trimmer", "DecoderPool")  # Serve deployment names, in pipeline order
TEXT_STAGES = ("DecoderPool",)  # a request without images needs the decoder only


class StageUnavailable(Exception):
    """A stage the request needs has no running replica."""

    def __init__(self, stages: list[str]):
        super().__init__(f"no running replica of {', '.join(stages)}; try again later")
        self.stages = stages


class Poller:
    """A background task (`_poll`), started on first use: an event loop is running by then."""

    task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        raise NotImplementedError


class StageWatch(Poller):
    """Running-replica counts per stage, refreshed from `serve.status()` every `period_s` by a background task that
    starts on first use (the controller learns of a dead replica from its health check, `health_check_period_s`)."""

    def __init__(self, app: str, stages: tuple[str, ...] = STAGES, period_s: float = 0.5):
        self.app, self.stages, self.period_s = app, stages, period_s
        self.running: dict[str, int] = {}  # empty until the first poll: unknown counts as available
        self.updated_at = 0.0

    async def _poll(self) -> None:
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[self.app].deployments
                self.running = {s: int(deployments[s].replica_states.get("RUNNING", 0))
                                for s in self.stages if s in deployments}
                self.updated_at = time.monotonic()
            except Exception:  # the controller restarting: keep the last view, try again
                pass
            await asyncio.sleep(self.period_s)

    def down(self, stages: tuple[str, ...] = STAGES) -> list[str]:
        """The stages among `stages` with no running replica."""
        self.ensure_started()
        return [s for s in stages if self.running.get(s, 1) == 0]

    def check(self, stages: tuple[str, ...]) -> None:
        down = self.down(stages)
        if down:
            raise StageUnavailable(down)

    async def wait_up(self, stages: tuple[str, ...], timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` for every stage in `stages` to have a running replica; the ones still down."""
        deadline = time.monotonic() + timeout_s
        while (down := self.down(stages)) and time.monotonic() < deadline:
            await asyncio.sleep(min(self.period_s, max(0.0, deadline - time.monotonic())))
        return down

    async def first(self, items, stages: tuple[str, ...], grace_s: float = 0.0):
        """`items.__anext__()`, or StageUnavailable once a stage the request waits on has had no running replica
        for `grace_s` (Serve would hold the request until one is back, however long that takes)."""
        step = asyncio.ensure_future(items.__anext__())
        down_since = None
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=self.period_s)
                if done:
                    return step.result()
                down = self.down(stages)
                down_since = (down_since or time.monotonic()) if down else None
                if down and time.monotonic() - down_since >= grace_s:
                    raise StageUnavailable(down)
        finally:
            step.cancel()  # a no-op once it is done; else the client left or the stage went down

    def report(self) -> dict:
        """For /health: each stage "ok" or "unavailable", and how fresh the view is."""
        self.ensure_started()
        stages = {s: ("unavailable" if self.running.get(s, 1) == 0 else "ok") for s in self.stages}
        age = round(time.monotonic() - self.updated_at, 3) if self.updated_at else None
        return {"stages": stages, "running_replicas": dict(self.running), "view_age_s": age}
