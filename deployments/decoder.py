"""DecoderPool deployment: the continuous-batching engine (`parts=("text",)`) inside each replica; streams
typed items per request (deployments/stream.py) and reports its free KV budget to the KVBudgetRouter."""

import asyncio
import contextlib
import dataclasses
import logging
import time

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.metrics import Gauge

from pipeline.config import EngineConfig, ModelConfig
from pipeline.engine.async_engine import AsyncLLMEngine
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.errors import EngineDead, InvalidRequest, Overloaded
from pipeline.model.loader import load_model

from .handoff import Handoff
from .settings import DecoderSettings
from .stream import Queued, StageError

log = logging.getLogger("ray.serve")


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    # check_health raises once the engine's step loop has died: Serve replaces the replica within seconds.
    health_check_period_s=2.0,
    # Above the engine's running + waiting slots, so the engine (not Serve's queue) decides when to refuse.
    max_ongoing_requests=512,
    request_router_config=RequestRouterConfig(
        request_router_class="deployments.router:KVBudgetRouter",
        request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=1.0,
    ),
)
class DecoderPool:
    def __init__(self, model: ModelConfig, engine: EngineConfig):
        self.cfg = engine
        self.loaded = load_model(model, parts=("text",))
        self.engine = AsyncLLMEngine(LLMEngine(self.loaded, engine))
        self.peak_running = self.peak_batch = 0
        self.avg_request_kv_bytes = 0.0
        self.gauges = {name: Gauge(f"crosstrim_decoder_{name}", description=desc) for name, desc in (
            ("running", "Sequences being decoded"), ("waiting", "Sequences waiting for KV budget"),
            ("kv_used_bytes", "Bytes of the KV pages held"), ("kv_budget_bytes", "KV budget of the replica"),
            ("kv_written_bytes", "Bytes of K/V written in the held pages"),
            ("swapped", "Sequences preempted to host memory"), ("preemptions", "Preemptions since start"),
            ("prefix_cached_pages", "KV pages in the prefix cache (held or evictable)"),
            ("prefix_hit_rate", "Prompt tokens taken from the prefix cache / prompt tokens admitted"),
            ("prompt_rows_computed", "Prompt rows prefilled since start (cached rows are not computed)"),
            ("sheds", "Sequences shed to their elastic floor since start"),
            ("shed_tokens", "Kept visual tokens dropped by sheds since start"),
            ("kv_pressure", "KV pages held plus those queued requests need, over all pages"),
        )}

    def check_health(self) -> None:
        """Serve's health check: raises once the engine's step loop has died (its streams have ended with an
        error), so Serve replaces this replica instead of leaving it to answer 200 while serving nothing."""
        self.engine.check_health()

    async def inject_fault(self, message: str = "injected fault") -> None:
        """Fire drill, reachable through a deployment handle only (never over HTTP): the engine's step loop raises
        RuntimeError(message) between steps, as an unexpected error escaping it would (tests/serve)."""
        log.warning("injecting a fault into the engine's step loop: %s", message)
        self.engine.inject_fault(RuntimeError(message))

    def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): the engine's admission limits, from its next step on."""
        limits = DecoderSettings(**user_config).engine_limits
        self.engine.set_limits(limits.max_running, limits.max_waiting)
        self.cfg = self.cfg.model_copy(update=dict(limits))

    def __del__(self):
        """Serve calls this once the replica, removed from routing, has finished its streams or run out of
        graceful_shutdown_timeout_s (sized from max_model_len: deployments/settings.py): stop the engine's thread."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def generate(self, handoff: Handoff, params: SamplingParams, request_id: str):
        """Yields DecoderItems (deployments/stream.py): a TrimSummary first when the request has an image, Queued
        once the engine counts it, then the engine's RequestOutputs; a failure of this request ends the stream with
        one StageError."""
        request = handoff.request()
        if request.image is not None:
            yield handoff.summary(request, received_at=time.time())
        if params.structured is not None:
            # Compiled (and, the first time, xgrammar's tokenizer info built) in a thread, not on this event loop;
            # cached, so the engine's own check finds it compiled.
            try:
                await asyncio.to_thread(self.engine.engine.grammars.compiled, params.structured)
            except InvalidRequest as exc:
                yield StageError(400, str(exc))
                return
        stream = self.engine.generate(request, params, request_id, ack=True)
        del handoff, request  # the engine drops the big resume tensors after the prefill; hold no other reference
        failed = StageError(500, f"the decoder failed on request {request_id}")
        async with contextlib.aclosing(stream):  # an abandoned stream frees its KV at once
            try:
                async for out in stream:
                    if out is None:  # the engine's ack: its queue_room counts this request from now on
                        yield Queued()
                        continue
                    if out.error is not None:  # this request alone failed in the engine; the rest go on
                        yield failed
                        break
                    self._observe()
                    yield out
            except InvalidRequest as exc:
                yield StageError(400, str(exc))
            except (Overloaded, EngineDead) as exc:  # a dead engine: this replica is being replaced
                yield StageError(503, str(exc))
            except Exception as exc:  # noqa: BLE001 - logged here; the client sees no internals
                log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
                yield failed
        self._observe()

    def _observe(self) -> dict:
        s = self.engine.stats()
        self.peak_running = max(self.peak_running, s.running)
        self.peak_batch = max(self.peak_batch, s.last_batch_size)
        if s.running:
            self.avg_request_kv_bytes = s.kv_used_bytes / s.running
        for name in self.gauges:
            self.gauges[name].set(getattr(s, name))
        return {**dataclasses.asdict(s), "prefix_hit_rate": s.prefix_hit_rate}

    def _snapshot(self) -> dict:
        """The engine's stats with this replica's peaks and admission limits: what /stats shows for it."""
        return {**self._observe(), "peak_running": self.peak_running, "peak_batch": self.peak_batch,
                "max_running": self.cfg.max_running, "max_waiting": self.cfg.max_waiting}

    async def stats(self) -> dict:
        """The snapshot; raises (EngineDead) if the engine has stopped, so the ingress's /health says 503."""
        self.engine.check_health()
        return self._snapshot()

    async def pressure(self) -> float:
        """The engine's KV pressure (LLMEngine.pressure): what an elastic trim policy reads (docs/elastic.md)."""
        return self.engine.pressure()

    async def kv_bytes_per_token(self) -> float:
        """KV bytes a sequence reserves per token of prompt + max_tokens (the ingress's per-key accounting)."""
        return self.engine.kv_bytes_per_token()

    async def load_stats(self) -> dict:
        return self.loaded.load_stats()

    async def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (POST /reset_prefix_cache fans this out); returns the pages it held."""
        return await self.engine.reset_prefix_cache()

    async def reset_peaks(self) -> None:
        self.peak_running = self.peak_batch = 0

    async def record_routing_stats(self) -> dict:
        """Called by Serve every request_routing_stats_period_s; read by KVBudgetRouter."""
        s = self._snapshot()
        alive = self.engine.error is None
        return {
            "kv_free_bytes": s["kv_budget_bytes"] - s["kv_used_bytes"],
            "requests": s["running"] + s["waiting"],
            "capacity": self.cfg.max_running + self.cfg.max_waiting if alive else 0,  # a dead engine takes nothing
            "queue_room": self.engine.queue_room(),  # requests it would still queue: the ingress's admission
            "avg_request_kv_bytes": self.avg_request_kv_bytes,
            "prefix": self.engine.prefix_digest(),  # the router prefers a replica that holds a request's prefix
            "engine": s,  # for /stats, which sums the pool's replicas
        }
