"""Typed configuration for the pipeline stages; the YAML under configs/ mirrors these models."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Where the checkpoint lives and how to place it."""

    source: str = "bundled:tiny-mllama"  # local dir, s3://bucket/prefix, hub id, bundled:NAME, preset:bench
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Split the text layers over several devices (embeddings and vision tower on the first, norm and lm_head on the
    # last): "auto" = every GPU the actor holds (cuda:0..N-1), or a list (e.g. ["cpu", "cpu"]); None = `device` only.
    devices: Literal["auto"] | list[str] | None = None
    cache_dir: str | None = None  # where s3:// checkpoints are downloaded; default ~/.cache/crosstrim
    max_images: int = Field(2, ge=1)  # images per prompt the deployment accepts
    max_prompt_tokens: int = Field(1024, ge=1)


class TrimConfig(_Strict):
    """Which visual tokens the cross-attention layers keep (the Trimmed-Llama selection and ablations)."""

    policy: Literal["topk_union", "target", "budget", "mass", "random", "none", "elastic"] = "topk_union"
    k_ratio: float = Field(0.15, gt=0.0, le=1.0)  # topk_union: per head, keep ceil(k_ratio * tokens)
    # target: per image exactly ceil(target_fraction * tokens), the per-head top-k union with k searched for it
    target_fraction: float = Field(0.5, gt=0.0, le=1.0)
    budget_tokens: int = Field(64, ge=1)  # budget: the same per-head top-k, k fixed per image
    mass: float = Field(0.5, gt=0.0, le=1.0)  # mass: per head, fewest tokens holding this share of attention
    seed: int = 0  # random: a control keeping budget_tokens tokens chosen at random
    trim_first_layer: bool = False  # also recompute the first cross-attention layer from the kept tokens only
    # elastic (docs/elastic.md): per image exactly ceil(f * tokens), as `target`, with f following the decoder pool's
    # KV pressure p: ceiling_fraction while p <= pressure_low, floor_fraction once p >= pressure_high, linear between;
    # a running sequence may later be shed down to its floor when the engine runs out of pages.
    floor_fraction: float = Field(0.3, gt=0.0, le=1.0)  # where the demo model's accuracy curve bends (BENCHMARKS)
    ceiling_fraction: float = Field(1.0, gt=0.0, le=1.0)
    pressure_low: float = Field(0.5, ge=0.0, le=1.0)
    pressure_high: float = Field(0.9, ge=0.0, le=1.0)
    elastic: bool = True  # False (a request's opt-out): an elastic policy keeps its ceiling and is never shed
    # The pool's pressure the request saw: (KV pages in use + pages its queued requests need) / pages, set by whoever
    # sends the request (the ingress from the decoder pool, Pipeline and the batch job from their engine). None: 0.
    pressure: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _elastic_bounds(self) -> "TrimConfig":
        if self.floor_fraction > self.ceiling_fraction:
            raise ValueError(f"floor_fraction {self.floor_fraction} is above ceiling_fraction {self.ceiling_fraction}")
        if self.pressure_low >= self.pressure_high:
            raise ValueError(f"pressure_low {self.pressure_low} must be below pressure_high {self.pressure_high}")
        return self

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @property
    def sheddable(self) -> bool:
        """Its sequences may be shed down to floor_fraction in flight."""
        return self.policy == "elastic" and self.elastic

    def elastic_fraction(self) -> float:
        """The kept fraction an elastic policy picks at `pressure` (the ceiling when opted out)."""
        p = self.pressure or 0.0
        if not self.elastic or p <= self.pressure_low:
            return self.ceiling_fraction
        if p >= self.pressure_high:
            return self.floor_fraction
        t = (p - self.pressure_low) / (self.pressure_high - self.pressure_low)
        return self.ceiling_fraction + t * (self.floor_fraction - self.ceiling_fraction)


class EngineConfig(_Strict):
    """The decoder engine: KV memory budget and queue."""

    kv_budget_bytes: int = Field(64 * 2**20, ge=1)
    max_running: int = Field(64, ge=1)  # sequences decoded together at most
    max_waiting: int = Field(256, ge=0)  # bounded queue; beyond it requests are refused as overloaded
    max_model_len: int = Field(2048, ge=2)  # prompt + generated tokens of one sequence
    # Rows one step runs through the model (vLLM's max_num_batched_tokens): each decoding sequence's one row
    # first, then chunks of prompts being prefilled fill the rest, so a long prompt is prefilled over several
    # steps while the running streams keep getting a token every step. Smaller: steadier streams, a long prompt's
    # first token later; at least max_running + a chunk (with none left, prompts still get one row a step).
    step_token_budget: int = Field(512, ge=1)
    # "paged": self-attention K/V pages allocated as tokens come, preemption when none is free; "reserved": the
    # prompt + max_tokens allocated at admission (the pre-paging behaviour, kept for comparison in benchmarks)
    kv_allocation: Literal["paged", "reserved"] = "paged"
    block_size: int = Field(16, ge=1)  # self-attention tokens a KV page (cross pages hold n_self/n_cross as many)
    kv_watermark: float = Field(0.01, ge=0.0, lt=1.0)  # pages kept free at admission, for running sequences
    # Host memory for preempted sequences' K/V. It never overflows: a request is admitted only while every admitted
    # sequence at its max_tokens fits the KV budget plus this less the largest one (so any preemption's copy fits);
    # below one sequence's worst case nothing is ever preempted and admission holds instead (docs/architecture.md).
    swap_budget_bytes: int = Field(4 * 2**30, ge=0)
    grammar_cache_size: int = Field(64, ge=1)  # compiled structured-output grammars kept (least recently used out)
    # decode steps replayed from CUDA graphs captured at bucketed batch sizes; None: on when the model is on CUDA.
    # Never on CPU (there is nothing to capture).
    cuda_graphs: bool | None = None
    # Prefix caching (docs/prefix_caching.md): full self-attention pages of text-only prompts and of image prompts'
    # rows before the first image, keyed by content, shared and kept (evicted least recently used) after use.
    prefix_caching: bool = True
