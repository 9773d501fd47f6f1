"""`crosstrim batch`: Parquet rows (local or s3://) through encoder -> trimmer -> decoder actor pools on Ray Data,
one output row per input row, failures in an `error` column."""

import io
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import EngineConfig, ModelConfig, TrimConfig
from .decoder import make_generation
from .encoder import VisionEncoder, VisualFeatures
from .engine import LLMEngine
from .errors import InvalidRequest
from .inputs import PreparedPrompt, decode_image, prepare_prompt, user_message
from .loader import load_model
from .sampling import SamplingParams
from .trimmer import Trimmer, TrimResult

log = logging.getLogger(__name__)

# Between stages a row is (id, error, state): `state` is the stage's output serialized with torch.save.
STATE_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string()), ("state", pa.binary())])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("visual_tokens", pa.int64()), ("kept_tokens", pa.int64()), ("finish_reason", pa.string()),
    ("error", pa.string()),
])
TOKEN_IDS_FIELD = pa.field("token_ids", pa.list_(pa.int64()))  # written when BatchConfig.write_token_ids
IMAGE_COLUMNS = ("image", "image_uri")


# ---------------------------------------------------------------------------------------------- configuration

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


# ------------------------------------------------------------------------------------------------- storage

@dataclass(frozen=True)
class S3Settings:
    """Endpoint and region from the standard AWS environment; credentials stay with each process's default
    chain (env, profile, IRSA, instance role), so none are copied into task arguments."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        return cls(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs = {"region": self.region} if self.region else {}
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs |= {"endpoint_override": url.netloc or url.path, "scheme": url.scheme or "https"}
        return pafs.S3FileSystem(**kwargs)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


def resolve_uri(uri: str, s3: S3Settings) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path, file:// or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        return s3.filesystem(), uri.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def input_columns(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], int]:
    """The columns the job reads (id, prompt, and image and/or image_uri) and the input's row count."""
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise InvalidRequest(f"cannot read Parquet input {uri!r}: {exc}") from exc
    names = dataset.schema.names
    missing = [c for c in ("id", "prompt") if c not in names]
    if missing:
        raise InvalidRequest(f"input {uri!r} lacks column(s) {missing}; it has {names}")
    return ["id", "prompt"] + [c for c in IMAGE_COLUMNS if c in names], dataset.count_rows()


def check_disjoint(input_path: str, output_path: str) -> None:
    """The output prefix is replaced on every run, so it must neither hold nor sit inside the input."""
    a, b = input_path.rstrip("/") + "/", output_path.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise InvalidRequest(f"output {output_path!r} overlaps input {input_path!r}; "
                             "the output is replaced on each run")


class ImageReader:
    """Bytes of an `image_uri`: a local path (file:// optional) or s3://bucket/key through boto3."""

    def __init__(self, s3: S3Settings):
        self.s3 = s3
        self._client = None

    def read(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            return self._read_s3(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise InvalidRequest(f"image_uri {uri!r}: only local paths and s3:// are supported")
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise InvalidRequest(f"image_uri {uri!r} does not exist")
        return path.read_bytes()

    def _read_s3(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if self._client is None:
            self._client = self.s3.client()  # boto3 clients are thread-safe; one per actor
        try:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise InvalidRequest(f"image_uri {uri!r} does not exist") from exc
            raise InvalidRequest(f"image_uri {uri!r} could not be read ({code}: {exc})") from exc
        except BotoCoreError as exc:
            raise InvalidRequest(f"image_uri {uri!r} could not be read ({type(exc).__name__}: {exc})") from exc


# -------------------------------------------------------------------------------------------------- stages

def pack(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def row_error(exc: Exception, stage: str) -> str:
    """The message for the `error` column; unexpected failures are logged with their traceback too."""
    if isinstance(exc, InvalidRequest):
        return str(exc)
    log.exception("%s failed on a row", stage)
    return f"{stage} failed: {type(exc).__name__}: {exc}"


def state_table(rows: list[tuple]) -> pa.Table:
    ids, errors, states = zip(*rows) if rows else ((), (), ())
    return pa.table([pa.array(ids, pa.string()), pa.array(errors, pa.string()), pa.array(states, pa.binary())],
                    schema=STATE_SCHEMA)


def _threads_for(pool: PoolConfig) -> None:
    torch.set_num_threads(max(1, round(pool.num_cpus)))


class EncodeStage:
    """Read and decode each row's image, apply the chat template, run the vision tower. Text-only rows are
    only tokenized; a row that fails carries its error onward."""

    def __init__(self, cfg: BatchConfig, s3: S3Settings):
        _threads_for(cfg.encoder)
        self.cfg = cfg.model
        self.loaded = load_model(cfg.model, parts=("vision",))
        self.encoder = VisionEncoder(self.loaded)
        self.reader = ImageReader(s3)
        self.fetch_pool = ThreadPoolExecutor(cfg.image_fetch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images = list(self.fetch_pool.map(self._image, rows))  # I/O overlaps across the batch
        return state_table([self._encode(row, image) for row, image in zip(rows, images)])

    def _image(self, row: dict):
        """The row's image, None for a text-only row, or the exception that explains why there is none."""
        data, uri = row.get("image"), row.get("image_uri")
        try:
            if data is not None and uri is not None:
                raise InvalidRequest("row has both image and image_uri; give one")
            if data is not None:
                return decode_image(data, what="image")
            if uri is not None:
                return decode_image(self.reader.read(uri), what=f"image_uri {uri!r}")
            return None
        except Exception as exc:
            return exc

    def _encode(self, row: dict, image) -> tuple:
        rid = None if row["id"] is None else str(row["id"])
        try:
            if isinstance(image, Exception):
                raise image
            if rid is None:
                raise InvalidRequest("row has no id")
            if not isinstance(row["prompt"], str):
                raise InvalidRequest("row has no prompt")
            images = [] if image is None else [image]
            prepared = prepare_prompt(self.loaded.processor, user_message(row["prompt"], len(images)), images,
                                      self.cfg.max_images, self.cfg.max_prompt_tokens)
            if not images:
                return rid, None, pack({"input_ids": prepared.input_ids})
            visual = self.encoder.encode(prepared)
            return rid, None, pack({
                "input_ids": prepared.input_ids, "cross_attention_mask": prepared.cross_attention_mask,
                "features": visual.features.cpu(), "token_valid": visual.token_valid.cpu(),
            })
        except Exception as exc:
            return rid, row_error(exc, "encoder"), None


class TrimStage:
    """Trimmed-Llama selection per row: features in, the decoder's resume state (kept K/V) out."""

    def __init__(self, cfg: BatchConfig):
        _threads_for(cfg.trimmer)
        self.loaded = load_model(cfg.model, parts=("text",))
        self.trimmer = Trimmer(self.loaded, cfg.trim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = [batch.column(c).to_pylist() for c in ("id", "error", "state")]
        return state_table([self._trim(*row) for row in zip(*cols)])

    def _trim(self, rid, error, blob) -> tuple:
        if error is not None:
            return rid, error, None
        try:
            state = unpack(blob)
            if "features" not in state:  # text-only: nothing to trim
                return rid, None, blob
            dev = self.loaded.device
            prepared = PreparedPrompt(input_ids=state["input_ids"], cross_attention_mask=state["cross_attention_mask"])
            visual = VisualFeatures(state["features"].to(dev), state["token_valid"].to(dev))
            trim = self.trimmer.trim(prepared, visual)
            return rid, None, pack({"trim": trim.to("cpu").__dict__})
        except Exception as exc:
            return rid, row_error(exc, "trimmer"), None


class DecodeStage:
    """Every row of a batch goes into one continuous-batching LLMEngine, stepped until all are done."""

    def __init__(self, cfg: BatchConfig):
        _threads_for(cfg.decoder)
        self.loaded = load_model(cfg.model, parts=("text",))
        self.engine = LLMEngine(self.loaded, cfg.engine)
        self.params = cfg.sampling
        self.schema = cfg.output_schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = [batch.column(c).to_pylist() for c in ("id", "error", "state")]
        results: dict[int, dict] = {}
        pending = deque()
        for i, (rid, error, blob) in enumerate(zip(*cols)):
            if error is not None:
                results[i] = {"id": rid, "error": error}
                continue
            try:
                state = unpack(blob)
                source = TrimResult(**state["trim"]) if "trim" in state else state["input_ids"].tolist()
                pending.append((i, self.engine.make_sequence(source, self.params, request_id=f"row-{i}")))
            except Exception as exc:  # e.g. prompt + max_tokens over max_model_len, KV that never fits
                results[i] = {"id": rid, "error": row_error(exc, "decoder")}
        self._run(pending, cols[0], results)
        rows = [results[i] for i in range(len(cols[0]))]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _run(self, pending: deque, ids: list, results: dict) -> None:
        running = []
        try:
            while pending or self.engine.has_work():
                # Feed the bounded queue as it drains; admission by KV budget happens inside step().
                while pending and self.engine.stats().waiting < self.engine.cfg.max_waiting:
                    i, seq = pending.popleft()
                    running.append((i, self.engine.add(seq)))
                self.engine.step()
        except Exception as exc:  # a failed step: fail what was in flight, keep the actor usable
            message = row_error(exc, "decoder")
            for request_id in list(self.engine.seqs):
                self.engine.abort(request_id)
            unfinished = [i for i, _ in pending] + [i for i, seq in running if seq.finish_reason in (None, "abort")]
            for i in unfinished:
                results[i] = {"id": ids[i], "error": message}
        for i, seq in running:
            if i in results:
                continue
            gen = make_generation(seq, seq.trim if seq.trim is not None else seq.prompt_token_ids)
            results[i] = {"id": ids[i], "text": gen.text, "prompt_tokens": gen.prompt_tokens,
                          "completion_tokens": len(gen.token_ids), "visual_tokens": gen.visual_tokens,
                          "kept_tokens": gen.kept_tokens, "finish_reason": gen.finish_reason,
                          "token_ids": gen.token_ids}


# ---------------------------------------------------------------------------------------------------- job

@dataclass
class BatchSummary:
    input_rows: int
    rows: int
    errors: int
    mean_kept_ratio: float | None  # mean over rows with an image and no error
    completion_tokens: int
    seconds: float
    output: str

    @property
    def complete(self) -> bool:
        return self.rows == self.input_rows

    def line(self) -> str:
        kept = "n/a" if self.mean_kept_ratio is None else f"{self.mean_kept_ratio:.3f}"
        secs = max(self.seconds, 1e-9)
        warn = "" if self.complete else f" [WARNING: {self.input_rows} input rows]"
        return (f"crosstrim batch: {self.rows} rows, {self.errors} errors, mean kept ratio {kept}, "
                f"{self.rows / secs:.2f} rows/s, {self.completion_tokens / secs:.1f} tokens/s "
                f"({self.seconds:.1f} s) -> {self.output}{warn}")


def pool_args(pool: PoolConfig) -> dict:
    import ray.data

    lo, hi = (pool.concurrency, pool.concurrency) if isinstance(pool.concurrency, int) else pool.concurrency
    return dict(compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), batch_size=pool.batch_size,
                num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, batch_format="pyarrow",
                udf_modifying_row_count=False)


def build_dataset(cfg: BatchConfig, fs: pafs.FileSystem, path: str, columns: list[str], s3: S3Settings):
    """read -> EncodeStage -> TrimStage -> DecodeStage, each stage its own actor pool."""
    import ray.data

    ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=cfg.io_num_cpus).select_columns(columns)
    # A Parquet file is one block; cut it into encoder batches so the stages stream instead of taking turns.
    ds = ds.repartition(target_num_rows_per_block=cfg.encoder.batch_size)
    ds = ds.map_batches(EncodeStage, fn_constructor_args=(cfg, s3), **pool_args(cfg.encoder))
    ds = ds.map_batches(TrimStage, fn_constructor_args=(cfg,), **pool_args(cfg.trimmer))
    return ds.map_batches(DecodeStage, fn_constructor_args=(cfg,), **pool_args(cfg.decoder))


@dataclass
class BatchJob:
    """Where a job reads and writes, checked before any Ray work starts."""

    input_uri: str
    output_uri: str
    in_fs: pafs.FileSystem
    in_path: str
    out_fs: pafs.FileSystem
    out_path: str
    columns: list[str]
    input_rows: int

    @classmethod
    def resolve(cls, input_uri: str, output_uri: str, s3: S3Settings) -> "BatchJob":
        in_fs, in_path = resolve_uri(input_uri, s3)
        out_fs, out_path = resolve_uri(output_uri, s3)
        check_disjoint(in_path, out_path)
        columns, input_rows = input_columns(in_fs, in_path, input_uri)
        return cls(input_uri, output_uri, in_fs, in_path, out_fs, out_path, columns, input_rows)


def execute(cfg: BatchConfig, job: BatchJob, s3: S3Settings) -> BatchSummary:
    """Run the job on the Ray cluster this process is connected to. The output prefix is cleared first
    (SaveMode.OVERWRITE), so a re-run replaces the previous output instead of adding rows to it."""
    from ray.data import SaveMode

    t0 = time.perf_counter()
    ds = build_dataset(cfg, job.in_fs, job.in_path, job.columns, s3)
    ds.write_parquet(job.out_path, filesystem=job.out_fs, mode=SaveMode.OVERWRITE,
                     ray_remote_args={"num_cpus": cfg.io_num_cpus})
    seconds = time.perf_counter() - t0
    return summarize(job, seconds)


def run_batch(cfg: BatchConfig, input_uri: str, output_uri: str, s3: S3Settings | None = None) -> BatchSummary:
    s3 = s3 or S3Settings.from_env()
    return execute(cfg, BatchJob.resolve(input_uri, output_uri, s3), s3)


def summarize(job: BatchJob, seconds: float) -> BatchSummary:
    """Counted from the files written, so the line reports what is really in the output."""
    fs, path = job.out_fs, job.out_path
    if fs.get_file_info(path).type == pafs.FileType.NotFound:  # nothing written (no input rows)
        table = OUTPUT_SCHEMA.empty_table()
    else:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["error", "visual_tokens", "kept_tokens", "completion_tokens"])
    rows = table.to_pylist()
    ratios = [r["kept_tokens"] / r["visual_tokens"] for r in rows if r["error"] is None and r["visual_tokens"]]
    return BatchSummary(
        input_rows=job.input_rows, rows=len(rows), errors=sum(r["error"] is not None for r in rows),
        mean_kept_ratio=sum(ratios) / len(ratios) if ratios else None,
        completion_tokens=sum(r["completion_tokens"] or 0 for r in rows), seconds=seconds, output=job.output_uri,
    )


# ---------------------------------------------------------------------------------------------------- CLI

def add_args(sub) -> None:
    p = sub.add_parser("batch", help="run a Parquet dataset through encoder -> trimmer -> decoder on Ray Data")
    p.add_argument("--input", required=True, help="Parquet file or directory: local path or s3://bucket/prefix "
                                                   "(columns id, prompt, and image and/or image_uri)")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix; its contents are replaced")
    p.add_argument("--config", help="BatchConfig YAML, e.g. configs/batch-local.yaml (default: built-in defaults)")
    trim = p.add_mutually_exclusive_group()
    trim.add_argument("--k-ratio", type=float, help="Trimmed-Llama: per head keep ceil(k_ratio * tokens)")
    trim.add_argument("--no-trim", action="store_true", help="keep every visual token")
    p.add_argument("--max-tokens", type=int, help="overrides sampling.max_tokens")
    p.add_argument("--model", help="overrides model.source")
    p.add_argument("--token-ids", action="store_true", help="also write each row's generated token ids")
    p.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")


def apply_overrides(cfg: BatchConfig, args) -> BatchConfig:
    """CLI flags over the YAML, validated like the YAML."""
    data = cfg.model_dump()
    if args.no_trim:
        data["trim"]["policy"] = "none"
    if args.k_ratio is not None:
        data["trim"] |= {"policy": "topk_union", "k_ratio": args.k_ratio}
    if args.max_tokens is not None:
        data["sampling"]["max_tokens"] = args.max_tokens
    if args.model:
        data["model"]["source"] = args.model
    if args.token_ids:
        data["write_token_ids"] = True
    return BatchConfig.model_validate(data)


def run(args) -> int:
    import ray

    cfg = apply_overrides(load_config(args.config), args)
    s3 = S3Settings.from_env()
    job = BatchJob.resolve(args.input, args.output, s3)  # bad paths and schemas fail before Ray starts
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local")
    try:
        summary = execute(cfg, job, s3)
    finally:
        if started:
            ray.shutdown()
    print(summary.line(), flush=True)
    return 0 if summary.complete else 1

