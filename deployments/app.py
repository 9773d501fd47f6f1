"""The Serve application: `build_app(args)` composes Ingress -> (VisionEncoder -> Trimmer ->) DecoderPool.

`serve run configs/local.yaml` calls it with the YAML's `applications[].args` (import path
`deployments.app:build_app`); the YAML's `deployments:` section overrides each deployment's Ray options.
"""

from ray import serve

from .config import AppConfig
from .decoder import DecoderPool
from .encoder import VisionEncoderDeployment
from .ingress import Ingress
from .trimmer import TrimmerDeployment


def build_app(args: dict) -> serve.Application:
    cfg = AppConfig(**args)
    encoder = VisionEncoderDeployment.bind(cfg.model, cfg.feature_cache_mib)
    trimmer = TrimmerDeployment.bind(cfg.model, cfg.trim, cfg.ship)
    decoder = DecoderPool.bind(cfg.model, cfg.engine)
    return Ingress.bind(cfg, encoder, trimmer, decoder)
