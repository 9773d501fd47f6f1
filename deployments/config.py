"""Typed application config: mirrors `applications[].args` of the Serve YAML under configs/."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.config import EngineConfig, ModelConfig, TrimConfig

from .urls import normalize_http


class StageBatching(BaseModel):
    """A stage deployment's Serve batching (`@serve.batch`): up to max_batch_size concurrent calls run as one
    forward, the first waiting at most batch_wait_timeout_s for the others. Results equal one call at a time."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)  # keep the deployment's max_ongoing_requests at least this
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # a lone request waits this long for company


class AppConfig(BaseModel):
    """What `build_app(args)` accepts; per-deployment Ray options live in the YAML's `deployments:` section."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    trim: TrimConfig = Field(default_factory=TrimConfig)  # the default; a request may override it
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # What crosses from trimmer to decoder: every cross layer's K/V of the kept tokens ("kv"), or the kept
    # features ("features", the decoder projects K/V; fewer bytes when there are many cross layers).
    ship: Literal["kv", "features"] = "kv"
    served_model_name: str = "crosstrim-tiny"
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # per image, after decoding (decompression bombs fail)
    max_image_bytes: int = Field(20 * 2**20, ge=1)  # per image, encoded
    max_prompt_chars: int = Field(64 * 1024, ge=1)  # cheap guard before tokenizing
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none (it reserves KV for all of them)
    s3_buckets: list[str] = Field(default_factory=list)  # s3://BUCKET/... image URLs allowed from these only
    http_allowlist: list[str] = Field(default_factory=list)  # URL prefixes; empty refuses http(s) images
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    feature_cache_mib: int = Field(256, ge=0)  # encoder features of recent images kept (LRU, MiB); 0 disables
    # The trimmer's prefix cache (docs/prefix_caching.md): its layers' K/V of blind-prefix pages (LRU, MiB), so a
    # shared system prompt runs through the trimmer once; on only with engine.prefix_caching (the decoder would
    # otherwise compute the rows the trimmer leaves out). 0 disables.
    trimmer_prefix_cache_mib: int = Field(64, ge=0)
    encoder_batching: StageBatching = Field(default_factory=StageBatching)  # VisionEncoder calls per tower forward
    trimmer_batching: StageBatching = Field(default_factory=StageBatching)  # Trimmer calls per forward
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header of a 503 or 429
    # Front-door admission (deployments/admission.py): a request the decoder pool could not queue is refused with 503
    # before any stage runs; it may first wait this long for room (0: refused at once).
    admission_wait_s: float = Field(0.0, ge=0)
    # Hostile clients: checked before the body is parsed (see deployments/limits.py).
    max_body_bytes: int = Field(32 * 2**20, ge=1)  # 413 past it; leave room for max_images base64 images
    body_read_timeout_s: float = Field(10.0, gt=0)  # 408 when the whole body has not arrived by then
    max_messages: int = Field(256, ge=1)  # refused before templating and tokenising
    # API keys: comma-separated in this environment variable (k8s: from a Secret); unset or empty: no auth.
    api_key_env: str = "CROSSTRIM_API_KEYS"
    # Per client key (the API key; without auth, the client address); 0: no limit. Past them: 429 + Retry-After.
    per_key_max_concurrent: int = Field(0, ge=0)
    per_key_max_kv_bytes: int = Field(0, ge=0)  # KV reserved by the key's requests in flight (n x (prompt + max_tokens))
    # How long a request waits for a stage with no running replica before 503: long enough to ride out a replica's
    # restart on one node, short where a node (and its replicas) can be gone for good.
    stage_wait_s: float = Field(5.0, ge=0)
    health_timeout_s: float = Field(0.8, gt=0)  # /health is 503 when a stage does not answer by then
    # Draining a replica that is being removed (deployments/settings.py, drain_options): the slowest decode step rate
    # at which its longest stream (max_model_len tokens) must still finish, the longest encode or trim call, and slack.
    min_decode_steps_per_s: float = Field(10.0, gt=0)
    stage_call_s: float = Field(60.0, gt=0)
    drain_margin_s: float = Field(10.0, ge=0)

    @field_validator("http_allowlist")
    @classmethod
    def _http_prefixes(cls, prefixes: list[str]) -> list[str]:
        for p in prefixes:
            if not p.startswith(("http://", "https://")):
                raise ValueError(f"http_allowlist entry {p!r} must start with http:// or https://")
            if normalize_http(p) is None:
                raise ValueError(f"http_allowlist entry {p!r} is not a plain URL prefix (user info, an encoded "
                                 "slash or a backslash)")
        return prefixes
