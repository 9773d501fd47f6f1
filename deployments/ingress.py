"""The HTTP ingress (OpenAI chat completions over FastAPI): preprocesses with the processor alone, sends the prompt
through VisionEncoder -> Trimmer -> DecoderPool (text-only: DecoderPool alone) and streams the tokens back."""

import asyncio
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from pipeline.errors import InvalidRequest, Overloaded
from pipeline.model.inputs import decode_image, prepare_prompt
from pipeline.model.loader import load_processor
from pipeline.types import PreparedPrompt

from . import api
from .availability import STAGES, TEXT_STAGES, StageUnavailable, StageWatch, replica_lost
from .config import AppConfig
from .images import ImageFetcher, image_key
from .replicas import aggregate, routing_stats

TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

app = FastAPI(title="crosstrim", description=__doc__)


class ApiError(Exception):
    """Ends a request with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(api.error_body(self.status, self.message), status_code=self.status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON or a schema violation: 400 naming the field, as OpenAI answers."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(api.error_body(400, f"invalid request: {problems}"), status_code=400)


def error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and message for an exception from a stage."""
    exc = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception; the original is its cause
    if isinstance(exc, InvalidRequest):
        return 400, str(exc)
    if isinstance(exc, (Overloaded, BackPressureError)):
        return 503, "the server is overloaded; try again later"
    if isinstance(exc, StageUnavailable):
        return 503, str(exc)
    if replica_lost(exc):
        return 503, "a replica serving the request was lost; try again"
    return 500, f"internal error: {type(exc).__name__}: {exc}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: AppConfig, encoder: DeploymentHandle, trimmer: DeploymentHandle,
                 decoder: DeploymentHandle):
        self.cfg = cfg
        self.processor = load_processor(cfg.model)
        # HF fast tokenizers raise "Already borrowed" when threads use one at once; images decode in parallel.
        self.processor_lock = threading.Lock()
        self.fetcher = ImageFetcher(cfg)
        self.encoder, self.trimmer = encoder, trimmer
        self.decoder = decoder.options(stream=True)
        self.decoder_calls = decoder
        self.ttft = Histogram("crosstrim_ttft_seconds", boundaries=TTFT_BUCKETS_S, tag_keys=("kind",),
                              description="Request arrival to first token at the ingress")
        self.itl = Histogram("crosstrim_inter_token_seconds", boundaries=ITL_BUCKETS_S,
                             description="Time between streamed tokens at the ingress")
        self.requests = Counter("crosstrim_requests", tag_keys=("status",), description="Requests by HTTP status")
        self.watch = StageWatch(serve.get_replica_context().app_name)

    # ---- endpoints

    @app.get("/health")
    async def health(self) -> dict:
        down = self.watch.down()
        if down:
            raise ApiError(503, f"unavailable: {', '.join(down)} (no running replica)", self.cfg.retry_after_s)
        try:
            await asyncio.wait_for(self.decoder_calls.stats.remote(), timeout=5.0)
        except Exception as exc:
            raise ApiError(503, f"decoder unavailable: {type(exc).__name__}") from exc
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "crosstrim"}]}

    @app.get("/stats")
    async def stats(self) -> dict:
        """Internal view for operators and tests: the decoder pool's engine stats summed over its replicas (each
        replica's too), the encoder cache."""
        app = serve.get_replica_context().app_name
        pool, encoder = await asyncio.gather(routing_stats(app, "DecoderPool"), self.encoder.cache_stats.remote())
        replicas = [s["engine"] for s in pool]
        return {"decoder": aggregate(replicas), "decoder_replicas": replicas, "encoder_cache": encoder}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: api.ChatCompletionRequest):
        t0 = time.perf_counter()
        try:
            items, first = await self._start(req, api.completion_id())
        except Exception as exc:
            if not isinstance(exc, ApiError):  # never a bare 500 without a body
                status, message = error_status(exc)
                exc = ApiError(status, message, self._retry_after(status))
            error = exc
            self.requests.inc(tags={"status": str(error.status)})
            raise error
        self.ttft.observe(time.perf_counter() - t0, tags={"kind": "image" if first.get("trim") else "text"})
        self.requests.inc(tags={"status": "200"})
        if req.stream:
            return StreamingResponse(self._sse(req, items, first), media_type="text/event-stream")
        return await self._collect(req, items, first)

    # ---- the pipeline

    async def _start(self, req: api.ChatCompletionRequest, rid: str):
        """Preprocess and send the request down the stages; return the decoder stream and its first item
        (errors before the first token become HTTP statuses here, before any byte is sent)."""
        if req.model not in (None, self.cfg.served_model_name):
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{self.cfg.served_model_name!r}")
        try:
            params = api.to_sampling_params(req, self.cfg.default_max_tokens)
            trim_cfg = api.to_trim_config(req.trim, self.cfg.trim)
            prepared, keys = await self._prepare(req)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc)) from exc
        room = self.cfg.engine.max_model_len - len(prepared.input_ids)
        if req.max_tokens is None and req.max_completion_tokens is None and 0 < room < params.max_tokens:
            params = params.model_copy(update={"max_tokens": room})  # the default never makes a request fail
        stages = STAGES if prepared.num_images else TEXT_STAGES
        self.watch.check(stages)  # 503 at once rather than Serve queueing for a replica that is not there
        items = self._send(prepared, keys, params.model_dump(), trim_cfg, rid)
        try:
            first = await self.watch.first(items, stages)
        except asyncio.CancelledError:
            items.cancel()
            raise
        except StopAsyncIteration:
            raise ApiError(500, "the decoder ended the stream without output") from None
        except Exception as exc:
            items.cancel()
            status, message = error_status(exc)
            raise ApiError(status, message, self._retry_after(status)) from exc
        if "error" in first:
            status = first["error"]["status"]
            raise ApiError(status, first["error"]["message"], self._retry_after(status))
        return items, first

    def _retry_after(self, status: int) -> int | None:
        return self.cfg.retry_after_s if status == 503 else None

    async def _prepare(self, req: api.ChatCompletionRequest) -> tuple[PreparedPrompt, list[str]]:
        messages, urls = api.to_hf_messages(req.messages)
        max_images = self.cfg.model.max_images
        if len(urls) > max_images:
            raise InvalidRequest(f"{len(urls)} images in one request; this deployment accepts at most {max_images}")
        if api.prompt_chars(req.messages) > self.cfg.max_prompt_chars:
            raise InvalidRequest(f"the prompt is longer than {self.cfg.max_prompt_chars} characters")
        blobs = await asyncio.gather(*(self.fetcher.fetch(u, f"image {i + 1}") for i, u in enumerate(urls)))
        prepared = await asyncio.to_thread(self._preprocess, messages, blobs)
        return prepared, [image_key(b) for b in blobs]

    def _preprocess(self, messages: list[dict], blobs: list[bytes]) -> PreparedPrompt:
        images = [decode_image(b, self.cfg.max_image_pixels, f"image {i + 1}") for i, b in enumerate(blobs)]
        m = self.cfg.model
        try:
            with self.processor_lock:
                return prepare_prompt(self.processor, messages, images, m.max_images, m.max_prompt_tokens)
        except InvalidRequest:
            raise
        except Exception as exc:  # the processor choking on an odd input is the input's fault
            raise InvalidRequest(f"could not preprocess the request: {type(exc).__name__}: {exc}") from exc

    def _send(self, prepared: PreparedPrompt, keys: list[str], params: dict, trim_cfg, rid: str):
        """Chain the stages by handle: each stage's result goes to the next through the object store,
        never through this replica."""
        if prepared.num_images == 0:
            return self.decoder.generate.remote(prepared.input_ids.tolist(), params, rid)
        visual = self.encoder.encode.remote(prepared, keys)
        # The trimmer needs the ids and the cross-attention mask, not the pixels.
        for_trimmer = PreparedPrompt(input_ids=prepared.input_ids, cross_attention_mask=prepared.cross_attention_mask)
        handoff = self.trimmer.trim.remote(for_trimmer, visual, trim_cfg)
        return self.decoder.generate.remote(handoff, params, rid)

    # ---- responses

    def _extra(self, req: api.ChatCompletionRequest, trim: dict | None, token_ids: list[int]) -> dict:
        extra = {"trim": trim}
        if req.return_token_ids:
            extra["token_ids"] = token_ids
        return extra

    async def _collect(self, req, items, first) -> dict:
        text, token_ids, item = [], [], first
        try:
            while True:
                if "error" in item:
                    raise ApiError(item["error"]["status"], item["error"]["message"])
                text.append(item["new_text"])
                token_ids += item["new_token_ids"]
                if item["finished"]:
                    break
                item = await self._next(items)
        finally:
            items.cancel()  # a no-op when finished; frees the KV when the client went away mid-request
        return api.completion(first["request_id"], self.cfg.served_model_name, "".join(text), item["finish_reason"],
                              item["prompt_tokens"], item["completion_tokens"],
                              self._extra(req, first.get("trim"), token_ids))

    @staticmethod
    async def _next(items) -> dict:
        """The next decoder item; a failure mid-stream (a replica lost) becomes an error item."""
        try:
            return await items.__anext__()
        except (asyncio.CancelledError, StopAsyncIteration):
            raise
        except Exception as exc:
            status, message = error_status(exc)
            return {"error": {"status": status, "message": message}}

    async def _sse(self, req, items, first):
        rid, model = first["request_id"], self.cfg.served_model_name
        token_ids, last, prev = [], first, time.perf_counter()
        try:
            yield sse(api.chunk(rid, model, {"role": "assistant", "content": ""}))
            item = first
            while True:
                if "error" in item:  # after the 200 header the error travels in the stream
                    yield sse(api.error_body(item["error"]["status"], item["error"]["message"]))
                    break
                token_ids += item["new_token_ids"]
                last = item
                if item["finished"]:
                    yield sse(api.chunk(rid, model, {"content": item["new_text"]} if item["new_text"] else {},
                                        item["finish_reason"], **self._extra(req, first.get("trim"), token_ids)))
                    break
                if item["new_text"]:
                    yield sse(api.chunk(rid, model, {"content": item["new_text"]}))
                item = await self._next(items)
                now = time.perf_counter()
                self.itl.observe(now - prev)
                prev = now
            if req.stream_options and req.stream_options.include_usage:
                yield sse(api.usage_chunk(rid, model, last["prompt_tokens"], last["completion_tokens"]))
            yield "data: [DONE]\n\n"
        finally:
            items.cancel()  # the client disconnected (or we are done): stop the decoder's generator
