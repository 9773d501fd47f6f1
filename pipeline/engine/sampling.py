"""Sampling parameters and the per-sequence sampler (greedy, temperature, top-k, top-p, seeded)."""

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 means greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 means off
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # with logprobs: this many most likely tokens a position
    n: int = Field(1, ge=1, le=16)  # completions of one prompt, sharing its prompt and image KV pages

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """Each sequence owns its generator, so a seeded request samples the same whatever shares its batch."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> tuple[int, float]:
    """logits (V,) -> (token, its log-probability under the distribution sampled from)."""
    logits = logits.float()
    if params.greedy:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, -1)[token]) if params.logprobs else 0.0
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    token = int(torch.multinomial(probs, 1, generator=gen))
    return token, float(torch.log(probs[token])) if params.logprobs else 0.0
