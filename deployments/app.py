"""The Serve application: `build_app(args)` composes Ingress -> (VisionEncoder -> Trimmer ->) DecoderPool.

`serve run configs/local.yaml` calls it with the YAML's `applications[].args` (import path
`deployments.app:build_app`); the YAML's `deployments:` section overrides each deployment's options, its
`user_config` included (what changes in place: deployments/settings.py, docs/upgrades.md).
"""

from ray import serve

from . import settings
from .config import AppConfig
from .decoder import DecoderPool
from .encoder import VisionEncoderDeployment
from .ingress import Ingress
from .trimmer import TrimmerDeployment


def build_app(args: dict) -> serve.Application:
    cfg = AppConfig(**args)
    stage, stream = settings.drain_options(cfg, streams=False), settings.drain_options(cfg, streams=True)
    encoder = VisionEncoderDeployment.options(user_config=settings.encoder_settings(cfg), **stage).bind(
        cfg.model, cfg.feature_cache_mib)
    trimmer = TrimmerDeployment.options(user_config=settings.trimmer_settings(cfg), **stage).bind(
        cfg.model, cfg.trim, cfg.ship, cfg.trimmer_prefix_cache_mib if cfg.engine.prefix_caching else 0,
        cfg.engine.block_size)
    decoder = DecoderPool.options(user_config=settings.decoder_settings(cfg), **stream).bind(cfg.model, cfg.engine)
    return Ingress.options(user_config=settings.ingress_settings(cfg), **stream).bind(cfg, encoder, trimmer, decoder)
