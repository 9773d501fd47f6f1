"""The batch job's typed configuration: BatchConfig mirrors configs/batch-*.yaml, one PoolConfig per stage."""

from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest

# Between stages a row is (id, error, state): `state` is the stage's output serialized with torch.save.
STATE_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string()), ("state", pa.binary())])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("visual_tokens", pa.int64()), ("kept_tokens", pa.int64()), ("finish_reason", pa.string()),
    ("error", pa.string()),
])
TOKEN_IDS_FIELD = pa.field("token_ids", pa.list_(pa.int64()))  # written when BatchConfig.write_token_ids


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolConfig(_Strict):
    """One stage's actor pool: a fixed size or a [min, max] autoscaling range, and what each actor reserves."""

    concurrency: int | tuple[int, int] = 1
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)  # rows per map_batches call

    @field_validator("concurrency")
    @classmethod
    def _sizes(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if not 1 <= lo <= hi:
            raise ValueError(f"concurrency must be >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v


class BatchConfig(_Strict):
    """The YAML under configs/batch-*.yaml: model, trimming, decoder engine, sampling, and one pool per stage."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    trim: TrimConfig = Field(default_factory=TrimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=32))
    # Defaults fit one small machine: the pools reserve 1 CPU in all, leaving room for Ray Data's file listing
    # task (1 CPU) and the read/write tasks.
    encoder: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.25, batch_size=8))
    trimmer: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.25, batch_size=8))
    decoder: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=32))
    io_num_cpus: float = Field(0.25, ge=0)  # Parquet read and write tasks (I/O bound)
    image_fetch_threads: int = Field(8, ge=1)  # per encoder actor: image_uri objects read concurrently
    write_token_ids: bool = False  # also write each row's generated token ids (a final EOS included)
    # Per trimmer actor: its layers' K/V of repeated blind prefixes (rows before a row's image; LRU, MiB), with
    # engine.prefix_caching only (docs/prefix_caching.md). 0 disables.
    trimmer_prefix_cache_mib: int = Field(64, ge=0)

    @property
    def output_schema(self) -> pa.Schema:
        return OUTPUT_SCHEMA.append(TOKEN_IDS_FIELD) if self.write_token_ids else OUTPUT_SCHEMA

    @model_validator(mode="after")
    def _engine_takes_requests(self):
        if self.engine.max_waiting < 1:
            raise ValueError("engine.max_waiting must be >= 1 for batch jobs (rows queue inside the engine)")
        return self


def load_config(path: str | None) -> BatchConfig:
    if path is None:
        return BatchConfig()
    if not Path(path).is_file():
        raise InvalidRequest(f"config file {path!r} does not exist")
    return BatchConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
