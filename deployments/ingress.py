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
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest
from pipeline.model.inputs import decode_image, prepare_prompt
from pipeline.model.loader import load_processor
from pipeline.orchestration import run_stages
from pipeline.types import PreparedPrompt

from . import api
from .auth import KeyLedger, load_keys
from .availability import STAGES, TEXT_STAGES, StageUnavailable, StageWatch
from .config import AppConfig
from .faults import classify, log
from .handoff import Handoff
from .images import ImageFetcher, image_key
from .limits import Guard, GuardMiddleware
from .replicas import aggregate, routing_stats

TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

# No trailing-slash redirect: Starlette builds its Location from the Host header, which a client controls.
app = FastAPI(title="crosstrim", description=__doc__, redirect_slashes=False)
app.add_middleware(GuardMiddleware)
_fastapi_openapi = app.openapi


def _openapi() -> dict:
    """FastAPI's document without its generic 422 (this server answers a bad body with 400; see error_responses)."""
    schema = _fastapi_openapi()
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
    return schema


app.openapi = _openapi


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


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, an unparsable body, the guard's 408/413) in the OpenAI shape."""
    message = exc.detail if isinstance(exc.detail, str) else "invalid request"
    return JSONResponse(api.error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged, and a 500 without internals."""
    log.error("unhandled %s on %s: %s", type(exc).__name__, request.url.path, exc)
    return JSONResponse(api.error_body(500, "internal error"), status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON or a schema violation: 400 naming the field, as OpenAI answers."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return JSONResponse(api.error_body(400, f"invalid request: {problems}"), status_code=400)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2048)
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: AppConfig, encoder: DeploymentHandle, trimmer: DeploymentHandle,
                 decoder: DeploymentHandle):
        self.cfg = cfg
        self.processor = load_processor(cfg.model)
        # HF fast tokenizers raise "Already borrowed" when threads use one at once; images decode in parallel.
        self.processor_lock = threading.Lock()
        self.token_bytes = api.TokenBytes(self.processor.tokenizer)  # logprobs entries' token text and bytes
        self.fetcher = ImageFetcher(cfg)
        self.encoder, self.trimmer = encoder, trimmer
        self.decoder = decoder.options(stream=True)
        self.decoder_calls = decoder
        self.ttft = Histogram("crosstrim_ttft_seconds", boundaries=TTFT_BUCKETS_S, tag_keys=("kind",),
                              description="Request arrival to first token at the ingress")
        self.itl = Histogram("crosstrim_inter_token_seconds", boundaries=ITL_BUCKETS_S,
                             description="Time between streamed tokens at the ingress")
        self.requests = Counter("crosstrim_requests", tag_keys=("status",), description="Requests by HTTP status")
        keys = load_keys(cfg.api_key_env)
        app.state.guard = Guard(keys, cfg.max_body_bytes, cfg.body_read_timeout_s, cfg.retry_after_s,
                                KeyLedger(cfg.per_key_max_concurrent, cfg.per_key_max_kv_bytes))
        log.info("ingress: API keys %s (%d keys from $%s)", "on" if keys else "off", len(keys), cfg.api_key_env)
        self.kv_bytes_per_token: float | None = None  # from the decoder, on the first request that needs it
        self.watch = StageWatch(serve.get_replica_context().app_name)

    # ---- endpoints

    @app.get("/health", responses=api.error_responses(503))
    async def health(self) -> dict:
        """Every stage answers within health_timeout_s (a dead replica shows at once, a restarting one by then);
        a stage with no running replica at all (its node died) is named without waiting."""
        down = self.watch.down()
        if down:
            raise ApiError(503, f"unavailable: {', '.join(down)} (no running replica)", self.cfg.retry_after_s)
        stages = {"decoder": self.decoder_calls.stats, "encoder": self.encoder.cache_stats,
                  "trimmer": self.trimmer.ping}
        calls = {name: asyncio.ensure_future(asyncio.wait_for(m.remote(), self.cfg.health_timeout_s))
                 for name, m in stages.items()}
        down = []
        for name, call in calls.items():
            try:
                await call
            except Exception:
                down.append(name)
        if down:
            raise ApiError(503, f"unavailable: {', '.join(down)}", self.cfg.retry_after_s)
        return {"status": "ok"}

    @app.get("/v1/models", responses=api.error_responses(401))
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

    @app.post("/v1/chat/completions", responses=api.error_responses(400, 401, 404, 408, 413, 429, 500, 503))
    async def chat_completions(self, req: api.ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        rid = api.completion_id()
        try:
            items, first = await self._start(req, rid, request.state)
        except Exception as exc:
            if not isinstance(exc, ApiError):  # never a bare 500 without a body
                error = classify(exc, rid)
                exc = ApiError(error.status, error.message, self._retry_after(error.status))
            error = exc
            self.requests.inc(tags={"status": str(error.status)})
            raise error
        self.ttft.observe(time.perf_counter() - t0, tags={"kind": "image" if first.get("trim") else "text"})
        self.requests.inc(tags={"status": "200"})
        if req.stream:
            return StreamingResponse(self._sse(req, items, first), media_type="text/event-stream")
        return await self._collect(req, items, first)

    # ---- the pipeline

    async def _start(self, req: api.ChatCompletionRequest, rid: str, client):
        """Preprocess and send the request down the stages; return the decoder stream and its first item
        (errors before the first token become HTTP statuses here, before any byte is sent). A replica lost before
        the first token: sent once more (another replica, or the replacement), then 503."""
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
        await self._hold_kv(client, len(prepared.input_ids) + params.max_tokens)
        stages = STAGES if prepared.num_images else TEXT_STAGES
        for attempt in (1, 2):
            # A stage with no running replica: wait a bounded while for one (a restart), then 503, rather than
            # letting Serve queue the request for as long as the replica is gone (its node may be dead).
            down = await self.watch.wait_up(stages, self.cfg.stage_wait_s)
            if down:
                raise ApiError(503, str(StageUnavailable(down)), self.cfg.retry_after_s)
            items = self._send(prepared, keys, params, trim_cfg, rid)
            try:
                first = await self.watch.first(items, stages, self.cfg.stage_wait_s)  # ends if a stage stays down
            except asyncio.CancelledError:
                items.cancel()
                raise
            except StopAsyncIteration:
                raise ApiError(500, f"internal error (request {rid})") from None
            except Exception as exc:
                items.cancel()
                error = classify(exc, rid)
                if error.retryable and attempt == 1:
                    log.warning("request %s: retrying once after a lost replica", rid)
                    continue
                raise ApiError(error.status, error.message, self._retry_after(error.status)) from exc
            if "error" in first:
                status = first["error"]["status"]
                raise ApiError(status, first["error"]["message"], self._retry_after(status))
            return items, first

    async def _hold_kv(self, client, tokens: int) -> None:
        """Count the request's KV reservation against its key (released by the guard when the request ends)."""
        guard = app.state.guard
        if not guard.ledger.max_kv_bytes or not hasattr(client, "client_key"):
            return
        if self.kv_bytes_per_token is None:
            self.kv_bytes_per_token = await self.decoder_calls.kv_bytes_per_token.remote()
        nbytes = int(tokens * self.kv_bytes_per_token)
        if not guard.ledger.hold_kv(client.client_key, nbytes):
            raise ApiError(429, "this API key holds its share of the decoder's KV; try again when a request ends",
                           self.cfg.retry_after_s)
        client.kv_bytes = getattr(client, "kv_bytes", 0) + nbytes

    def _retry_after(self, status: int) -> int | None:
        return self.cfg.retry_after_s if status in (429, 503) else None

    async def _prepare(self, req: api.ChatCompletionRequest) -> tuple[PreparedPrompt, list[str]]:
        messages, urls = api.to_hf_messages(req.messages)
        max_images = self.cfg.model.max_images
        if len(urls) > max_images:
            raise InvalidRequest(f"{len(urls)} images in one request; this deployment accepts at most {max_images}")
        if api.prompt_chars(req.messages) > self.cfg.max_prompt_chars:
            raise InvalidRequest(f"the prompt is longer than {self.cfg.max_prompt_chars} characters")
        api.check_shape(req.messages, self.cfg.max_messages, self.cfg.model.max_prompt_tokens)
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
            log.warning("preprocessing refused an input: %s: %s", type(exc).__name__, exc)
            raise InvalidRequest("could not preprocess the request's text or images") from exc

    def _send(self, prepared: PreparedPrompt, keys: list[str], params: SamplingParams, trim_cfg, rid: str):
        """Chain the stages by handle: each stage's result goes to the next through the object store,
        never through this replica."""
        handoff = run_stages(prepared, lambda p: self.encoder.encode.remote(p, keys),
                             lambda p, visual: self.trimmer.trim.remote(p, visual, trim_cfg), Handoff.of)
        return self.decoder.generate.remote(handoff, params, rid)

    # ---- responses

    def _extra(self, req: api.ChatCompletionRequest, trim: dict | None, token_ids: list[int]) -> dict:
        extra = {"trim": trim}
        if req.return_token_ids:
            extra["token_ids"] = token_ids
        return extra

    async def _collect(self, req, items, first) -> dict:
        """Every item of the request's n completions, by index, into one response."""
        text, token_ids, logprobs = ([[] for _ in range(req.n)] for _ in range(3))
        last, item, done = {}, first, 0
        try:
            while True:
                if "error" in item:
                    status = item["error"]["status"]
                    raise ApiError(status, item["error"]["message"], self._retry_after(status))
                i = item.get("index", 0)
                text[i].append(item["new_text"])
                token_ids[i] += item["new_token_ids"]
                if req.logprobs:
                    logprobs[i] += self.token_bytes.entries(item)
                last[i] = item
                done += item["finished"]
                if done == req.n:
                    break
                item = await self._next(items)
        finally:
            items.cancel()  # a no-op when finished; frees the KV when the client went away mid-request
        choices = [api.choice(i, "".join(text[i]), last[i]["finish_reason"], logprobs[i] if req.logprobs else None)
                   for i in range(req.n)]
        extra = self._extra(req, first.get("trim"), token_ids[0] if req.n == 1 else token_ids)
        return api.completion(first["request_id"], self.cfg.served_model_name, choices, first["prompt_tokens"],
                              sum(last[i]["completion_tokens"] for i in range(req.n)), extra)

    @staticmethod
    async def _next(items) -> dict:
        """The next decoder item; a failure mid-stream (a replica lost) becomes an error item."""
        try:
            return await items.__anext__()
        except (asyncio.CancelledError, StopAsyncIteration):
            raise
        except Exception as exc:
            error = classify(exc)
            return {"error": {"status": error.status, "message": error.message}}

    async def _sse(self, req, items, first):
        rid, model = first["request_id"], self.cfg.served_model_name
        token_ids, last, prev = [[] for _ in range(req.n)], {}, time.perf_counter()
        try:
            for i in range(req.n):
                yield sse(api.chunk(rid, model, {"role": "assistant", "content": ""}, index=i))
            item, done = first, 0
            while True:
                if "error" in item:  # after the 200 header the error travels in the stream, then the choice ends
                    yield sse(api.error_body(item["error"]["status"], item["error"]["message"]))
                    for i in range(req.n):  # every choice still open ends here
                        if not last.get(i, {}).get("finished"):
                            yield sse(api.chunk(rid, model, {}, "error", index=i))
                    break
                i = item.get("index", 0)
                token_ids[i] += item["new_token_ids"]
                last[i] = item
                logprobs = self.token_bytes.entries(item) if req.logprobs and item["new_token_ids"] else None
                delta = {"content": item["new_text"]} if item["new_text"] else {}
                if item["finished"]:
                    done += 1
                    yield sse(api.chunk(rid, model, delta, item["finish_reason"], index=i, logprobs=logprobs,
                                        **self._extra(req, first.get("trim"), token_ids[i])))
                    if done == req.n:
                        break
                elif delta or logprobs:
                    yield sse(api.chunk(rid, model, delta, index=i, logprobs=logprobs))
                item = await self._next(items)
                now = time.perf_counter()
                self.itl.observe(now - prev)
                prev = now
            if req.stream_options and req.stream_options.include_usage:
                yield sse(api.usage_chunk(rid, model, first["prompt_tokens"],
                                          sum(x["completion_tokens"] for x in last.values())))
            yield "data: [DONE]\n\n"
        finally:
            items.cancel()  # the client disconnected (or we are done): stop the decoder's generator
