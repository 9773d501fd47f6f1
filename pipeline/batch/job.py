"""`crosstrim batch`: Parquet rows (local or s3://) through encoder -> trimmer -> decoder actor pools on Ray Data,
one output row per input row, failures in an `error` column; an OpenAI batch file (.jsonl) goes to its runner."""

import os
import time
from dataclasses import dataclass
from importlib.metadata import entry_points

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.batch.config import OUTPUT_SCHEMA, BatchConfig, PoolConfig, load_config
from pipeline.batch.io import check_disjoint, input_columns, resolve_uri
from pipeline.batch.stages import DecodeStage, EncodeStage, TrimStage
from pipeline.errors import InvalidRequest
from pipeline.storage import S3Settings


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
                udf_modifying_row_count=False,
                # A lost actor (kill -9, OOM, node loss) is restarted and its batch re-run there: the batch's rows
                # are written once, by the run that finishes (Ray Data's defaults, stated so they stay so).
                max_restarts=-1, max_task_retries=-1)


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
    p = sub.add_parser("batch", help="run a Parquet dataset through encoder -> trimmer -> decoder on Ray Data, "
                                     "or an OpenAI batch file (.jsonl) in process")
    p.add_argument("--input", required=True, help="Parquet file or directory: local path or s3://bucket/prefix "
                                                   "(columns id, prompt, and image and/or image_uri); or an OpenAI "
                                                   "batch file, FILE.jsonl (local or s3://)")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix; its contents are replaced "
                                                    "(a .jsonl input: the output JSONL file)")
    p.add_argument("--config", help="BatchConfig YAML, e.g. configs/batch-local.yaml (default: built-in defaults)")
    trim = p.add_mutually_exclusive_group()
    trim.add_argument("--k-ratio", type=float, help="Trimmed-Llama: per head keep ceil(k_ratio * tokens)")
    trim.add_argument("--no-trim", action="store_true", help="keep every visual token")
    p.add_argument("--max-tokens", type=int, help="overrides sampling.max_tokens")
    p.add_argument("--model", help="overrides model.source")
    p.add_argument("--token-ids", action="store_true", help="also write each row's generated token ids")
    p.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--served-model-name", help="a .jsonl input: the model name bodies may give "
                                               "(default: the Serve app's, crosstrim-tiny)")


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


def openai_batch_file():
    """The runner of OpenAI batch files: it reads bodies with the Serve layer's request models (deployments/
    batch_file.py), which pipeline/ may not import, so it is found through the `crosstrim.batch` entry point."""
    found = {ep.name: ep for ep in entry_points(group="crosstrim.batch")}
    if "openai" not in found:
        raise InvalidRequest("OpenAI batch files need crosstrim's Serve layer installed: pip install -e .")
    return found["openai"].load()


def run(args) -> int:
    import ray

    cfg = apply_overrides(load_config(args.config), args)
    if args.input.endswith(".jsonl"):
        return openai_batch_file()(cfg, args)
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

