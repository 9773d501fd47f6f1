"""VisionEncoder deployment: the vision tower and projector (`parts=("vision",)`), with an LRU cache of
per-image features keyed by the image's hash, so a repeated image skips the tower."""

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve
from ray.serve.metrics import Counter

from pipeline.config import ModelConfig
from pipeline.model.encoder import VisionEncoder
from pipeline.model.loader import load_model
from pipeline.types import PreparedPrompt, VisualFeatures

from .settings import EncoderSettings


class FeatureCache:
    """image key -> (features (tokens, hidden), token_valid (tokens,)); bounded in bytes, least recent out.

    Bytes, not entries: one 4-tile image of the 11B is 6,404 x 4,096 bf16 = 52 MB, so a count says nothing about
    the memory (on the GPU when the encoder runs there) an operator must leave for it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: str):
        item = self.entries.get(key)
        if item is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, item) -> None:
        size = item_bytes(item)
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = item
        self.bytes += size
        self.evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.evict()

    def evict(self) -> None:
        while self.bytes > self.max_bytes:
            self.bytes -= item_bytes(self.entries.popitem(last=False)[1])


def item_bytes(item: tuple[torch.Tensor, ...]) -> int:
    return sum(t.nbytes for t in item)


def select_images(prompt: PreparedPrompt, idx: list[int]) -> PreparedPrompt:
    """The same prompt's pixel inputs restricted to images `idx` (the tower treats images independently)."""
    return PreparedPrompt(
        input_ids=prompt.input_ids,
        pixel_values=prompt.pixel_values[:, idx],
        aspect_ratio_ids=prompt.aspect_ratio_ids[:, idx],
        aspect_ratio_mask=prompt.aspect_ratio_mask[:, idx],
    )


# Serve name "VisionEncoder" (the YAML's and the metrics'); the class name keeps it apart from the stage it wraps.
@serve.deployment(name="VisionEncoder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class VisionEncoderDeployment:
    def __init__(self, model: ModelConfig, cache_mib: int = 256):
        self.stage = VisionEncoder(load_model(model, parts=("vision",)))
        self.cache = FeatureCache(cache_mib * 2**20)
        self.pool = ThreadPoolExecutor(max_workers=1)  # one forward at a time; the event loop stays free
        self.lookups = Counter("crosstrim_encoder_cache_lookups", description="Feature cache lookups by result",
                               tag_keys=("result",))

    async def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): the cache's size; called by Serve before the first request too."""
        max_bytes = EncoderSettings(**user_config).feature_cache_mib * 2**20
        await asyncio.get_running_loop().run_in_executor(self.pool, self.cache.resize, max_bytes)  # the cache's thread

    async def encode(self, prompt: PreparedPrompt, image_keys: list[str]) -> VisualFeatures:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, prompt, image_keys)

    def _encode(self, prompt: PreparedPrompt, keys: list[str]) -> VisualFeatures:
        cached = [self.cache.get(k) for k in keys]
        missing = [i for i, c in enumerate(cached) if c is None]
        for result, n in (("hit", len(keys) - len(missing)), ("miss", len(missing))):
            if n:  # Ray counters refuse 0
                self.lookups.inc(n, tags={"result": result})
        if missing:
            fresh = self.stage.encode(select_images(prompt, missing) if len(missing) < len(keys) else prompt)
            if len(keys) == 1:  # the common case: no copies (a view of one image would pin all of `fresh`)
                self.cache.put(keys[0], (fresh.features[0], fresh.token_valid[0]))
                return fresh
            for j, i in enumerate(missing):
                cached[i] = (fresh.features[j].clone(), fresh.token_valid[j].clone())  # own storage, not a view
                self.cache.put(keys[i], cached[i])
        if len(keys) == 1:
            return VisualFeatures(features=cached[0][0][None], token_valid=cached[0][1][None])
        return VisualFeatures(features=torch.stack([c[0] for c in cached]),
                              token_valid=torch.stack([c[1] for c in cached]))

    def load_stats(self) -> dict:
        return self.stage.loaded.load_stats()

    def cache_stats(self) -> dict:
        c = self.cache
        return {"entries": len(c.entries), "bytes": c.bytes, "max_bytes": c.max_bytes, "hits": c.hits,
                "misses": c.misses}
