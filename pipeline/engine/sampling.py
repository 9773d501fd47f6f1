"""Sampling parameters and the per-sequence sampler (greedy, temperature, top-k, top-p, seeded)."""

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.engine.structured import StructuredOutput

# What the sampler can compute: torch.Generator.manual_seed takes [-2^63, 2^64); logits / temperature overflow
# float32 (inf, then NaN probabilities) below ~1e-37, so a floor well above that; top_p below float32's
# resolution of the cumulative sum keeps nothing.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 means greedy
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 means off
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # with logprobs: this many most likely tokens a position
    n: int = Field(1, ge=1, le=16)  # completions of one prompt, sharing its prompt and image KV pages
    structured: StructuredOutput | None = None  # the output's grammar (JSON schema, regex, choice, EBNF)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, t: float) -> float:
        if 0.0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return t

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
        drop[0] = False  # the likeliest token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    token = int(torch.multinomial(probs, 1, generator=gen))
    return token, float(torch.log(probs[token])) if params.logprobs else 0.0
