"""crosstrim's model-side library: `from pipeline import Pipeline, SamplingParams, TrimConfig` runs the three stages in
one process; `pipeline.engine` is the decoding engine, `pipeline.model` the stages, no Ray Serve anywhere in it.

Names are imported on first use, so `import pipeline.storage` (say, in a locust worker) does not load torch."""

import importlib

_EXPORTS = {
    "Pipeline": "pipeline.inprocess", "make_generation": "pipeline.inprocess",
    "ModelConfig": "pipeline.config", "TrimConfig": "pipeline.config", "EngineConfig": "pipeline.config",
    "SamplingParams": "pipeline.engine.sampling",
    "LLMEngine": "pipeline.engine.llm_engine", "AsyncLLMEngine": "pipeline.engine.async_engine",
    "load_model": "pipeline.model.loader", "LoadedModel": "pipeline.model.loaded",
    "PreparedPrompt": "pipeline.types", "VisualFeatures": "pipeline.types", "DecodeRequest": "pipeline.types",
    "ImageState": "pipeline.types", "ResumeState": "pipeline.types",
    "RequestOutput": "pipeline.types", "Generation": "pipeline.types",
    "CrosstrimError": "pipeline.errors", "InvalidRequest": "pipeline.errors", "Overloaded": "pipeline.errors",
    "ModelSourceError": "pipeline.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
