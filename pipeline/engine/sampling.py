"""Sampling parameters of one request, validated; the defaults change nothing (greedy, no filter, no penalty).

The fields and their ranges follow vLLM's `SamplingParams` and OpenAI's chat-completions parameters; what each
one does to the logits, and in which order, is `pipeline.engine.sampler.Sampler`'s docstring.
"""

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.engine.structured import StructuredOutput
from pipeline.errors import InvalidRequest

# What the sampler can compute: seeds are taken modulo 2^64 (the range is torch.Generator's); logits / temperature
# overflow float32 (inf, then NaN probabilities) below ~1e-37, so a floor well above that; top_p below float32's
# resolution of the cumulative sum keeps nothing.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: -100 (ban) .. 100 (force)
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2 .. 2


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(16, ge=0)  # 0: the prompt is only scored (prompt_logprobs), nothing is generated
    min_tokens: int = Field(0, ge=0)  # EOS and stop_token_ids cannot be sampled (stop strings not matched) before
    temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0 means greedy
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's) means off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # 0 means off
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # 1 means off; > 1 discourages repeats
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # with logprobs: this many most likely tokens a position
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # each prompt token's logprob and this many likeliest
    n: int = Field(1, ge=1, le=16)  # completions of one prompt, sharing its prompt and image KV pages
    structured: StructuredOutput | None = None  # the output's grammar (JSON schema, regex, choice, EBNF; xgrammar)
    # vLLM's: requests share prefix-cached pages only when their salts are equal (None is a salt of its own)
    cache_salt: str | None = Field(None, min_length=1)

    @field_validator("temperature")
    @classmethod
    def _temperature_floor(cls, t: float) -> float:
        if 0.0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return t

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float]) -> dict[int, float]:
        for token, value in bias.items():
            if token < 0:
                raise ValueError(f"logit_bias has a negative token id {token}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{token}] = {value} is outside [-100, 100]")
        return bias

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, ids: list[int]) -> list[int]:
        if any(t < 0 for t in ids):
            raise ValueError("stop_token_ids holds a negative token id")
        return ids

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingParams":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the penalties need this row's token counts."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the logits have no column for: InvalidRequest naming the field (a 400 at the API)."""
        bad = sorted(t for t in self.logit_bias if t >= vocab_size)
        if bad:
            raise InvalidRequest(f"logit_bias has token ids outside the vocabulary of {vocab_size}: {bad[:8]}")
