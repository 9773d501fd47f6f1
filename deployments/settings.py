"""What each deployment changes in place: its Serve `user_config` (the YAML's `deployments[].user_config`), applied by
the replica's `reconfigure` without replacing it, and only for that deployment. Everything in `applications[].args`
(AppConfig) is fixed for a replica's life: a change there is a new version of every deployment (Serve hashes the
args into the app's code version), replaced one at a time and drained (`drain_options`).

The builder fills each user_config from the args, so a config that sets these in args alone still works; a config
that sets them under `deployments:` can change them later without a restart."""

import math

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import TrimConfig

from .config import AppConfig, StageBatching


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngressSettings(_Settings):
    """Read per request: a new value applies to the requests that arrive after it."""

    trim: TrimConfig  # the default a request's `trim` field is merged over
    default_max_tokens: int = Field(ge=1)
    stage_wait_s: float = Field(ge=0)
    health_timeout_s: float = Field(gt=0)

    def applied_to(self, cfg: AppConfig) -> AppConfig:
        return cfg.model_copy(update=dict(self))


class EngineLimits(_Settings):
    """The decoder engine's admission limits (engine.max_running / max_waiting): the scheduler reads them each step."""

    max_running: int = Field(ge=1)
    max_waiting: int = Field(ge=0)


class DecoderSettings(_Settings):
    engine_limits: EngineLimits


class EncoderSettings(_Settings):
    feature_cache_mib: int = Field(ge=0)  # shrinking evicts the least recent entries at once
    batching: StageBatching  # the next batch formed uses it


class TrimmerSettings(_Settings):
    ship: str = Field(pattern="^(kv|features)$")  # per request: the decoder takes either
    batching: StageBatching  # the next batch formed uses it


def ingress_settings(cfg: AppConfig) -> dict:
    return IngressSettings(trim=cfg.trim, default_max_tokens=cfg.default_max_tokens, stage_wait_s=cfg.stage_wait_s,
                           health_timeout_s=cfg.health_timeout_s).model_dump()


def decoder_settings(cfg: AppConfig) -> dict:
    limits = EngineLimits(max_running=cfg.engine.max_running, max_waiting=cfg.engine.max_waiting)
    return DecoderSettings(engine_limits=limits).model_dump()


def encoder_settings(cfg: AppConfig) -> dict:
    return EncoderSettings(feature_cache_mib=cfg.feature_cache_mib, batching=cfg.encoder_batching).model_dump()


def trimmer_settings(cfg: AppConfig) -> dict:
    return TrimmerSettings(ship=cfg.ship, batching=cfg.trimmer_batching).model_dump()


def drain_options(cfg: AppConfig, streams: bool) -> dict:
    """Serve's graceful shutdown for a replica being removed (scale-down, redeploy): it gets no new requests and
    has until the timeout to finish the ones it holds. A stream can last max_model_len decode steps at the slowest
    step rate the deployment promises (`min_decode_steps_per_s`); a stage call (encode, trim) one forward."""
    timeout = math.ceil(cfg.engine.max_model_len / cfg.min_decode_steps_per_s) if streams else cfg.stage_call_s
    return {"graceful_shutdown_timeout_s": timeout + cfg.drain_margin_s, "graceful_shutdown_wait_loop_s": 1.0}
