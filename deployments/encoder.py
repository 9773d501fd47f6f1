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
from pipeline.orchestration import each_or_error
from pipeline.types import PreparedPrompt, VisualFeatures

from .batching import BatchSizes, apply_batching, batching_of, raised
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


def one_image(prompt: PreparedPrompt, i: int) -> PreparedPrompt:
    """Image i of a prompt's pixel inputs alone (the tower treats images independently)."""
    return PreparedPrompt(
        input_ids=prompt.input_ids,
        pixel_values=prompt.pixel_values[:, [i]],
        aspect_ratio_ids=prompt.aspect_ratio_ids[:, [i]],
        aspect_ratio_mask=prompt.aspect_ratio_mask[:, [i]],
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
        self.batches = BatchSizes("crosstrim_encoder_batch_size", "encode calls per batch (one tower forward)")

    async def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): the cache's size and the batching; called by Serve before the first
        request too."""
        settings = EncoderSettings(**user_config)
        apply_batching(self._encode_batch, settings.batching)
        max_bytes = settings.feature_cache_mib * 2**20
        await asyncio.get_running_loop().run_in_executor(self.pool, self.cache.resize, max_bytes)  # the cache's thread

    async def encode(self, prompt: PreparedPrompt, image_keys: list[str]) -> VisualFeatures:
        return raised(await self._encode_batch(prompt, image_keys))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # reconfigure sets both from the YAML
    async def _encode_batch(self, prompts: list[PreparedPrompt], keys: list[list[str]]) -> list:
        self.batches.observe(len(prompts))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode_many, prompts, keys)

    def _encode_many(self, prompts: list[PreparedPrompt], keys: list[list[str]]) -> list[VisualFeatures | Exception]:
        """Per call its features or its error. Cached images skip the tower; the rest (an image repeated in the
        batch once) run in one encode_batch, where a failure retries image by image so it fails its calls alone."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        todo: dict[str, PreparedPrompt] = {}  # image key -> that image alone
        failed: dict[str, Exception] = {}
        for prompt, ks in zip(prompts, keys):
            for i, key in enumerate(ks):
                if key in found or key in todo or key in failed:
                    continue
                item = self.cache.get(key)
                self.lookups.inc(tags={"result": "miss" if item is None else "hit"})
                if item is not None:
                    found[key] = item
                    continue
                try:
                    todo[key] = one_image(prompt, i)
                except Exception as exc:
                    failed[key] = exc
        for key, visual in zip(todo, each_or_error(self.stage.encode_batch, list(todo.values()))):
            if isinstance(visual, Exception):
                failed[key] = visual
                continue
            found[key] = (visual.features[0], visual.token_valid[0])  # own storage: encode_batch cloned its part
            self.cache.put(key, found[key])
        return [assemble([found.get(k) for k in ks], [failed.get(k) for k in ks]) for ks in keys]

    def load_stats(self) -> dict:
        return self.stage.loaded.load_stats()

    def cache_stats(self) -> dict:
        c = self.cache
        return {"entries": len(c.entries), "bytes": c.bytes, "max_bytes": c.max_bytes, "hits": c.hits,
                "misses": c.misses}

    def batch_stats(self) -> dict:
        return self.batches.stats() | batching_of(self._encode_batch)

    async def record_routing_stats(self) -> dict:
        """What /stats reads from every replica (Serve's per-replica hook, as the decoder pool uses it)."""
        return {"batches": self.batch_stats()}


def assemble(items: list, errors: list[Exception | None]) -> VisualFeatures | Exception:
    """One call's images from their cached or fresh (features, token_valid), or the first error among them."""
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        return error
    if len(items) == 1:  # the common case: no copies
        return VisualFeatures(features=items[0][0][None], token_valid=items[0][1][None])
    return VisualFeatures(features=torch.stack([f for f, _ in items]), token_valid=torch.stack([v for _, v in items]))
