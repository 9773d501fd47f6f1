"""The batch job's three stages as Ray Data actor classes: each takes a pyarrow batch of rows and returns one,
carrying a failed row's error onward instead of failing the job."""

import io
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import torch

from pipeline.batch.config import STATE_SCHEMA, BatchConfig, PoolConfig
from pipeline.batch.io import ImageReader
from pipeline.engine.llm_engine import LLMEngine
from pipeline.errors import InvalidRequest
from pipeline.inprocess import make_generation
from pipeline.model.encoder import VisionEncoder
from pipeline.model.inputs import decode_image, prepare_prompt, user_message
from pipeline.model.loader import load_model
from pipeline.model.trimmer import Trimmer
from pipeline.model.trimmer_cache import TrimmerPrefixCache
from pipeline.orchestration import each_or_error, run_stages_batched
from pipeline.storage import S3Settings
from pipeline.types import DecodeRequest, Payload, PreparedPrompt, VisualFeatures

log = logging.getLogger(__name__)


# A row's `state` between stages, torch.save'd: {"request": a DecodeRequest's payload} once it is a decode request
# (text-only rows from the encoder on), or {"trim_input": ...}, what the trimmer reads, from the encoder.
def pack(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def pack_request(request: DecodeRequest) -> bytes:
    return pack({"request": request.to("cpu").to_payload().as_dict()})


def unpack_request(state: dict) -> DecodeRequest:
    return DecodeRequest.from_payload(Payload(**state["request"]))


def pack_trim_input(prompt: PreparedPrompt, visual: VisualFeatures) -> bytes:
    return pack({"trim_input": {
        "input_ids": prompt.input_ids, "cross_attention_mask": prompt.cross_attention_mask,
        "features": visual.features.cpu(), "token_valid": visual.token_valid.cpu(),
    }})


def row_error(exc: Exception, stage: str) -> str:
    """The message for the `error` column; unexpected failures are logged with their traceback too."""
    if isinstance(exc, InvalidRequest):
        return str(exc)
    log.error("%s failed on a row", stage, exc_info=exc)
    return f"{stage} failed: {type(exc).__name__}: {exc}"


def result_row(rid, result: bytes | Exception, stage: str) -> tuple:
    """A state row: the stage's packed output, or the error that stopped it."""
    return (rid, row_error(result, stage), None) if isinstance(result, Exception) else (rid, None, result)


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
        prepared = [self._prepare(row, image) for row, image in zip(rows, images)]
        ok = [i for i, p in enumerate(prepared) if isinstance(p, PreparedPrompt)]
        # One tower call for the batch's images; the chain stops before the trimmer, which is the next actor pool.
        states = run_stages_batched([prepared[i] for i in ok], self.encoder.encode_batch,
                                    lambda prompts, visuals: list(map(pack_trim_input, prompts, visuals)),
                                    pack_request)
        for i, state in zip(ok, states):
            prepared[i] = state
        ids = [None if row["id"] is None else str(row["id"]) for row in rows]
        return state_table([result_row(rid, out, "encoder") for rid, out in zip(ids, prepared)])

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

    def _prepare(self, row: dict, image) -> PreparedPrompt | Exception:
        try:
            if isinstance(image, Exception):
                raise image
            if row["id"] is None:
                raise InvalidRequest("row has no id")
            if not isinstance(row["prompt"], str):
                raise InvalidRequest("row has no prompt")
            images = [] if image is None else [image]
            return prepare_prompt(self.loaded.processor, user_message(row["prompt"], len(images)), images,
                                  self.cfg.max_images, self.cfg.max_prompt_tokens)
        except Exception as exc:
            return exc


class TrimStage:
    """Trimmed-Llama selection per row: features in, the decoder's resume state (kept K/V) out."""

    def __init__(self, cfg: BatchConfig):
        _threads_for(cfg.trimmer)
        self.loaded = load_model(cfg.model, parts=("trim",))
        mib = cfg.trimmer_prefix_cache_mib if cfg.engine.prefix_caching else 0
        self.trimmer = Trimmer(self.loaded, cfg.trim, TrimmerPrefixCache.sized(mib, cfg.engine.block_size, self.loaded))

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = [batch.column(c).to_pylist() for c in ("id", "error", "state")]
        out: list[bytes | Exception | None] = [None] * len(cols[0])
        inputs = []  # (row, prompt, visual) of the rows to trim: one trim_batch for all of them
        for i, (error, blob) in enumerate(zip(cols[1], cols[2])):
            if error is not None:
                continue
            try:
                state = unpack(blob)
                if "request" in state:  # text-only: already a decode request
                    out[i] = blob
                    continue
                state, dev = state["trim_input"], self.loaded.device
                prepared = PreparedPrompt(input_ids=state["input_ids"],
                                          cross_attention_mask=state["cross_attention_mask"])
                inputs.append((i, prepared, VisualFeatures(state["features"].to(dev), state["token_valid"].to(dev))))
            except Exception as exc:
                out[i] = exc
        trimmed = each_or_error(lambda batch: self.trimmer.trim_batch([p for _, p, _ in batch], [v for *_, v in batch]),
                                inputs)
        for (i, *_), request in zip(inputs, trimmed):
            out[i] = request if isinstance(request, Exception) else pack_request(request)
        return state_table([(rid, error, None) if error is not None else result_row(rid, result, "trimmer")
                            for rid, error, result in zip(*cols[:2], out)])


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
                request = unpack_request(unpack(blob))
                pending.append((i, self.engine.make_sequence(request, self.params, request_id=f"row-{i}")))
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
                while pending and self.engine.has_room():
                    i, seq = pending.popleft()
                    running.append((i, self.engine.add(seq)))
                self.engine.step()
        except Exception as exc:  # a failed step: fail what was in flight, keep the actor usable
            message = row_error(exc, "decoder")
            self.engine.abort_all()
            unfinished = [i for i, _ in pending] + [i for i, seq in running if seq.finish_reason in (None, "abort")]
            for i in unfinished:
                results[i] = {"id": ids[i], "error": message}
        for i, seq in running:
            if i in results:
                continue
            if seq.finish_reason == "error":  # this row alone failed in the engine (logged there)
                results[i] = {"id": ids[i], "error": "decoder: the engine failed on this row"}
                continue
            gen = make_generation(seq)
            results[i] = {"id": ids[i], "text": gen.text, "prompt_tokens": gen.prompt_tokens,
                          "completion_tokens": len(gen.token_ids), "visual_tokens": gen.visual_tokens,
                          "kept_tokens": gen.kept_tokens, "finish_reason": gen.finish_reason,
                          "token_ids": gen.token_ids}
