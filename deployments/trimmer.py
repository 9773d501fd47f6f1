"""Trimmer deployment (`parts=("trim",)`): runs the prompt to the first cross-attention layer, keeps the top
visual tokens and hands the decoder only their K/V (or features) plus the small resume state; a shared system
prompt's rows run once (its prefix cache)."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.metrics import Counter

from pipeline.config import ModelConfig, TrimConfig
from pipeline.model.loader import load_model
from pipeline.model.trimmer import Trimmer
from pipeline.model.trimmer_cache import TrimmerPrefixCache
from pipeline.orchestration import each_or_error
from pipeline.types import DecodeRequest, PreparedPrompt, VisualFeatures

from .batching import BatchSizes, apply_batching, batching_of, raised
from .handoff import Handoff
from .settings import TrimmerSettings


@serve.deployment(
    name="Trimmer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16,
    # A request goes to the replica holding its system prompt's rows (deployments/trimmer_router.py).
    request_router_config=RequestRouterConfig(
        request_router_class="deployments.trimmer_router:TrimmerPrefixRouter",
        request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=1.0,
    ),
)
class TrimmerDeployment:
    def __init__(self, model: ModelConfig, trim: TrimConfig, ship: str = "kv", prefix_cache_mib: int = 0,
                 block_size: int = 16):
        """prefix_cache_mib: the trimmer's prefix cache (0: none), paged as a decoder engine of block_size pages (so
        both name a page alike)."""
        loaded = load_model(model, parts=("trim",))
        self.stage = Trimmer(loaded, trim, TrimmerPrefixCache.sized(prefix_cache_mib, block_size, loaded))
        self.ship = ship
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.visual_tokens = Counter("crosstrim_visual_tokens", description="Visual tokens seen by the trimmer")
        self.kept_tokens = Counter("crosstrim_kept_tokens", description="Visual tokens kept by the trimmer")
        self.shipped_bytes = Counter("crosstrim_shipped_bytes", tag_keys=("part",),
                                     description="Bytes handed from trimmer to decoder (cross K/V or features, "
                                                 "and the resume state)")
        self.batches = BatchSizes("crosstrim_trimmer_batch_size", "trim calls per batch (one forward)")
        self.prefix_rows = Counter("crosstrim_trimmer_prefix_rows", tag_keys=("result",),
                                   description="Prompt rows of the trimmer's cacheable prefixes: taken from its "
                                               "prefix cache (hit) or computed (miss)")

    def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): what crosses to the decoder, from the next call on, and the
        batching, from the next batch on."""
        settings = TrimmerSettings(**user_config)
        self.ship = settings.ship
        apply_batching(self._trim_batch, settings.batching)

    async def ping(self) -> bool:
        """For /health: the replica answers."""
        return True

    def load_stats(self) -> dict:
        return self.stage.loaded.load_stats()

    def batch_stats(self) -> dict:
        return self.batches.stats() | batching_of(self._trim_batch)

    async def record_routing_stats(self) -> dict:
        """What /stats reads from every replica (Serve's per-replica hook, as the decoder pool uses it)."""
        cache = self.stage.prefix_cache
        return {"batches": self.batch_stats(),
                "prefix_cache": None if cache is None else cache.stats() | {"rows_computed": self.stage.rows_computed},
                "prefix": None if cache is None else cache.digest()}  # read by TrimmerPrefixRouter

    async def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (POST /reset_prefix_cache fans this out), between trims: its pages."""
        cache = self.stage.prefix_cache
        if cache is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(self.pool, cache.reset)

    async def trim(self, prompt: PreparedPrompt, visual: VisualFeatures, cfg: TrimConfig | None = None) -> Handoff:
        handoff = raised(await self._trim_batch(prompt, visual, cfg))
        handoff.sent_at = time.time()  # stamped last: the hop starts when the result leaves
        return handoff

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # reconfigure sets both from the YAML
    async def _trim_batch(self, prompts: list[PreparedPrompt], visuals: list[VisualFeatures],
                          cfgs: list[TrimConfig | None]) -> list:
        self.batches.observe(len(prompts))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._trim_many, prompts, visuals, cfgs,
                                                                self.ship)

    def _trim_many(self, prompts, visuals, cfgs, ship: str) -> list[Handoff | Exception]:
        """One trim_batch for the calls; if it fails, each alone, so a bad call fails alone."""
        cache = self.stage.prefix_cache
        queried, hit = (cache.queried_rows, cache.hit_rows) if cache else (0, 0)
        requests = each_or_error(lambda calls: self.stage.trim_batch(*map(list, zip(*calls)), ship=ship),
                                 list(zip(prompts, visuals, cfgs)))
        if cache is not None:
            for result, rows in (("hit", cache.hit_rows - hit), ("miss", cache.queried_rows - queried - cache.hit_rows
                                                                   + hit)):
                if rows:  # Ray's counters take positive increments only
                    self.prefix_rows.inc(rows, tags={"result": result})
        return [r if isinstance(r, Exception) else self._handoff(r) for r in requests]

    def _handoff(self, request: DecodeRequest) -> Handoff:
        handoff = Handoff.of(request)
        self.visual_tokens.inc(sum(request.image.visual_tokens))
        self.kept_tokens.inc(sum(request.image.kept_tokens))
        self.shipped_bytes.inc(handoff.cross_bytes, tags={"part": "cross"})
        self.shipped_bytes.inc(handoff.nbytes - handoff.cross_bytes, tags={"part": "resume"})
        return handoff
