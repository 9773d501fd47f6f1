"""Trimmer deployment (`parts=("trim",)`): runs the prompt to the first cross-attention layer, keeps the top
visual tokens and hands the decoder only their K/V (or features) plus the small resume state."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.metrics import Counter

from pipeline.config import ModelConfig, TrimConfig
from pipeline.model.loader import load_model
from pipeline.model.trimmer import Trimmer
from pipeline.types import PreparedPrompt, VisualFeatures

from .handoff import Handoff
from .settings import TrimmerSettings


@serve.deployment(name="Trimmer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class TrimmerDeployment:
    def __init__(self, model: ModelConfig, trim: TrimConfig, ship: str = "kv"):
        self.stage = Trimmer(load_model(model, parts=("trim",)), trim)
        self.ship = ship
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.visual_tokens = Counter("crosstrim_visual_tokens", description="Visual tokens seen by the trimmer")
        self.kept_tokens = Counter("crosstrim_kept_tokens", description="Visual tokens kept by the trimmer")
        self.shipped_bytes = Counter("crosstrim_shipped_bytes", tag_keys=("part",),
                                     description="Bytes handed from trimmer to decoder (cross K/V or features, "
                                                 "and the resume state)")

    def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): what crosses to the decoder, from the next call on."""
        self.ship = TrimmerSettings(**user_config).ship

    async def ping(self) -> bool:
        """For /health: the replica answers."""
        return True

    def load_stats(self) -> dict:
        return self.stage.loaded.load_stats()

    async def trim(self, prompt: PreparedPrompt, visual: VisualFeatures, cfg: TrimConfig | None = None) -> Handoff:
        handoff = await asyncio.get_running_loop().run_in_executor(self.pool, self._trim, prompt, visual, cfg)
        handoff.sent_at = time.time()  # stamped last: the hop starts when the result leaves
        return handoff

    def _trim(self, prompt: PreparedPrompt, visual: VisualFeatures, cfg: TrimConfig | None) -> Handoff:
        request = self.stage.trim(prompt, visual, cfg, ship=self.ship)
        handoff = Handoff.of(request)
        self.visual_tokens.inc(sum(request.image.visual_tokens))
        self.kept_tokens.inc(sum(request.image.kept_tokens))
        self.shipped_bytes.inc(handoff.cross_bytes, tags={"part": "cross"})
        self.shipped_bytes.inc(handoff.nbytes - handoff.cross_bytes, tags={"part": "resume"})
        return handoff
