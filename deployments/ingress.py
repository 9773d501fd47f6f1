"""The HTTP ingress (OpenAI chat completions, completions and Responses over FastAPI): preprocesses with the
processor alone, sends the prompt through VisionEncoder -> Trimmer -> DecoderPool (text-only: DecoderPool alone) and
streams the tokens back."""

import asyncio
import dataclasses
import time

from fastapi import Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest
from pipeline.orchestration import run_stages
from pipeline.types import PreparedPrompt, RequestOutput

from . import api, validation
from .admission import DecoderRoom, NoRoom, Place
from .availability import STAGES, TEXT_STAGES, StageUnavailable, StageWatch
from .chat import ChatRenderer, completion_id
from .completions import TextPrompt, TextRenderer, text_body, text_completion_id, text_ending
from .config import AppConfig
from .constraints import tool_dicts
from .faults import classify, log
from .handoff import Handoff
from .http_app import ApiError, make_app
from .limits import Guard
from .metrics import scrape
from .preprocess import Preprocessor
from .pressure import PoolPressure
from .replicas import aggregate, each_replica, routing_stats
from .responses import Accumulator, DecoderStream, TokenBytes, chunks, collect, drain, events, merged, sse_events
from .responses_api import ResponsesRequest, to_chat
from .responses_renderer import ResponsesRenderer, response_id
from .settings import IngressSettings
from .stream import Queued, StageError, TrimSummary
from .version import git_revision, package_version

TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

app = make_app(description=__doc__)  # what @serve.ingress wraps; per-replica state lives on the Ingress instance


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2048)
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: AppConfig, encoder: DeploymentHandle, trimmer: DeploymentHandle,
                 decoder: DeploymentHandle):
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg)
        self.token_bytes = TokenBytes(self.preprocessor.tokenizer)  # logprobs entries' token text and bytes
        self.encoder, self.trimmer = encoder, trimmer
        self.decoder = decoder.options(stream=True)
        self.decoder_calls = decoder
        self.ttft = Histogram("crosstrim_ttft_seconds", boundaries=TTFT_BUCKETS_S, tag_keys=("kind",),
                              description="Request arrival to first token at the ingress")
        self.itl = Histogram("crosstrim_inter_token_seconds", boundaries=ITL_BUCKETS_S,
                             description="Time between streamed tokens at the ingress")
        self.requests = Counter("crosstrim_requests", tag_keys=("status",), description="Requests by HTTP status")
        self.guard = Guard.from_config(cfg)  # what GuardMiddleware enforces for this replica (http_app.replica_guard)
        log.info("ingress: API keys %s (%d keys from $%s)", "on" if self.guard.keys else "off", len(self.guard.keys),
                 cfg.api_key_env)
        self.kv_bytes_per_token: float | None = None  # from the decoder, on the first request that needs it
        self.pressure = PoolPressure(self.decoder_calls)  # what elastic trim policies read
        self.watch = StageWatch(serve.get_replica_context().app_name)
        self.revision = git_revision()
        self.admission = DecoderRoom(serve.get_replica_context().app_name, cfg.admission_wait_s)
        self.guard.admission = self.admission  # GuardMiddleware takes each request's place before reading its body

    def reconfigure(self, user_config: dict) -> None:
        """In place (deployments/settings.py): the defaults and waits every request reads, for the ones after it."""
        self.cfg = IngressSettings(**user_config).applied_to(self.cfg)

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
            except Exception:  # noqa: BLE001 - any failure or timeout means the stage is down
                down.append(name)
        if down:
            raise ApiError(503, f"unavailable: {', '.join(down)}", self.cfg.retry_after_s)
        return {"status": "ok"}

    @app.get("/version", responses=api.error_responses(401))
    async def version(self) -> dict:
        """vLLM's /version, with the served model's name and the code's git revision (null when unknown)."""
        return {"version": package_version(), "model": self.cfg.served_model_name, "revision": self.revision}

    @app.get("/v1/models", responses=api.error_responses(401))
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "crosstrim"}]}

    @app.get("/stats")
    async def stats(self) -> dict:
        """Internal view for operators and tests: the decoder pool's engine stats summed over its replicas (each
        replica's too), the encoder cache, and the batches each encoder and trimmer replica formed."""
        app = serve.get_replica_context().app_name
        pool, encoder, encoders, trimmers = await asyncio.gather(
            routing_stats(app, "DecoderPool"), self.encoder.cache_stats.remote(),
            routing_stats(app, "VisionEncoder"), routing_stats(app, "Trimmer"))
        replicas = [s["engine"] for s in pool]
        return {"decoder": aggregate(replicas), "decoder_replicas": replicas, "admission": self.admission.report(),
                "encoder_cache": encoder, "trimmer_prefix_cache": [s.get("prefix_cache") for s in trimmers],
                "stage_batches": {"encoder": [s["batches"] for s in encoders],
                                  "trimmer": [s["batches"] for s in trimmers]}}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(self) -> dict:
        """vLLM's: every decoder replica forgets its prefix cache (pages running requests hold stay theirs), and every
        trimmer replica its own."""
        app = serve.get_replica_context().app_name
        decoders, trimmers = await asyncio.gather(*(
            each_replica(app, name, "reset_prefix_cache", self.cfg.health_timeout_s, user=True)
            for name in ("DecoderPool", "Trimmer")))
        pages = [n for n in decoders.values() if n is not None]
        trimmer_pages = [n for n in trimmers.values() if n is not None]
        return {"status": "ok", "replicas": len(pages), "pages": sum(pages), "trimmer_replicas": len(trimmer_pages),
                "trimmer_pages": sum(trimmer_pages)}

    @app.get("/v1/models/{model_id}", responses=api.error_responses(401, 404))
    async def model(self, model_id: str) -> dict:
        if model_id != self.cfg.served_model_name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server serves {self.cfg.served_model_name!r}")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "crosstrim",
                "max_model_len": self.cfg.engine.max_model_len}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        """Ray's Prometheus export of every node (the names Ray's metrics port serves), on the API port."""
        return PlainTextResponse(await scrape(self.cfg.health_timeout_s * 4),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", responses=api.error_responses(400, 401, 404))
    async def tokenize(self, req: api.TokenizeRequest) -> dict:
        """vLLM's /tokenize: a prompt's (or a chat's, by the template) token ids; bounded as a completion's prompt
        is, tokenised off the event loop on the text tokenizer (never waiting on image preprocessing)."""
        self._check_model(req.model)
        pre = self.preprocessor

        def run() -> tuple[list[int], list[str] | None]:
            validation.check_request(req)
            if req.prompt is not None:
                validation.check_text_size(req.prompt, self.cfg.max_prompt_chars, "prompt")
                ids = pre.tokenize(req.prompt, req.add_special_tokens)
            else:
                pre.check_messages(req.messages)
                ids = pre.render(req.messages, req.add_generation_prompt)
            return ids, [self.token_bytes(t)["token"] for t in ids] if req.return_token_strs else None

        try:
            ids, strs = await asyncio.to_thread(run)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from exc
        return {"count": len(ids), "max_model_len": self.cfg.engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", responses=api.error_responses(400, 401, 404))
    async def detokenize(self, req: api.DetokenizeRequest) -> dict:
        """vLLM's /detokenize: at most max_model_len ids, each in the vocabulary; decoded off the event loop."""
        self._check_model(req.model)
        try:
            validation.check_token_ids(req.tokens, self.preprocessor.vocab, "tokens",
                                       max_count=self.cfg.engine.max_model_len)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from exc
        return {"prompt": await asyncio.to_thread(self.preprocessor.detokenize, req.tokens)}

    @app.post("/v1/chat/completions", responses=api.error_responses(400, 401, 404, 408, 413, 429, 500, 503))
    async def chat_completions(self, req: api.ChatCompletionRequest, request: Request):
        rid = completion_id()
        stream = await self._begin(req, rid, request.state, self._chat_prompt(req))
        render = ChatRenderer(req, rid, self.cfg.served_model_name, stream.trim, self.token_bytes)
        return await self._respond(req, stream, render)

    @app.post("/v1/responses", responses=api.error_responses(400, 401, 404, 408, 413, 429, 500, 503))
    async def responses(self, req: ResponsesRequest, request: Request):
        """OpenAI's Responses API, stateless (nothing is stored): computed as the chat request it translates to."""
        rid = response_id()
        try:
            chat = to_chat(req)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from exc
        stream = await self._begin(chat, rid, request.state, self._chat_prompt(chat))
        render = ResponsesRenderer(req, chat, rid, self.cfg.served_model_name, stream.trim, self.token_bytes)
        return await self._respond(chat, stream, render)

    @app.post("/v1/completions", responses=api.error_responses(400, 401, 404, 408, 413, 429, 500, 503))
    async def completions(self, req: api.CompletionRequest, request: Request):
        """Text completions: string or token-id prompts (several a request: choice i * n + j is prompt i's
        completion j), no chat template, no image; `echo` repeats each prompt (with logprobs, scored)."""
        rid = text_completion_id()
        prompts = req.prompts
        echoed: list[TextPrompt | None] = [None] * len(prompts)

        def prepare(i: int):
            async def run():
                params = await validation.sampling_params(req, self.preprocessor.vocab, self.cfg.default_max_tokens)
                prepared, keys = await self.preprocessor.prepare_text(prompts[i])
                if req.echo:
                    echoed[i] = await asyncio.to_thread(self._echo_of, prompts[i], prepared.input_ids.tolist())
                return params, prepared, keys
            return run

        # Each prompt its own engine request (ids rid-0, rid-1, ...), all begun before any byte is sent: one
        # refused fails the request, and the others are cancelled (their KV freed).
        rids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        begun = await asyncio.gather(*(self._begin(req, r, request.state, prepare(i)) for i, r in enumerate(rids)),
                                     return_exceptions=True)
        errors = [b for b in begun if isinstance(b, BaseException)]
        if errors:
            for b in begun:
                if not isinstance(b, BaseException):
                    b.close()
            raise errors[0]
        renders = [TextRenderer(req, rid, self.cfg.served_model_name, self.token_bytes, echoed[i], i * req.n)
                   for i in range(len(prompts))]
        accs = [Accumulator(req.n) for _ in prompts]
        if req.stream:
            items = merged([chunks(s, a, r, self.itl.observe) for s, a, r in zip(begun, accs, renders)])
            ending = lambda: text_ending(renders, accs)  # noqa: E731
            return StreamingResponse(sse_events(items, renders[0].frame, ending), media_type="text/event-stream")
        tasks = [asyncio.ensure_future(drain(s, a, self.cfg.retry_after_s)) for s, a in zip(begun, accs)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()  # each one's drain closes its stream
            raise
        return text_body(renders, accs)

    def _echo_of(self, prompt: str | list[int], ids: list[int]) -> TextPrompt:
        """What echo repeats: the prompt's text as sent (token ids: decoded), and its token ids."""
        return TextPrompt(prompt if isinstance(prompt, str) else self.preprocessor.detokenize(ids), ids)

    def _chat_prompt(self, req: api.ChatCompletionRequest):
        """`prepare` of a chat request: its SamplingParams, PreparedPrompt and image keys (see _start)."""
        async def prepare():
            params = await validation.sampling_params(req, self.preprocessor.vocab, self.cfg.default_max_tokens)
            return (params, *await self.preprocessor.prepare(req.messages, tool_dicts(req)))

        return prepare

    async def _begin(self, req, rid: str, client, prepare) -> DecoderStream:
        """The decoder's stream of a request, or its HTTP error (counted by status either way)."""
        t0 = time.perf_counter()
        try:
            stream = await self._start(req, rid, client, prepare)
        except Exception as exc:  # noqa: BLE001 - never a bare 500 without a body
            error = exc if isinstance(exc, ApiError) else ApiError.of(classify(exc, rid), self.cfg.retry_after_s)
            self.requests.inc(tags={"status": str(error.status)})
            raise error from None  # the client gets its own message; the cause is logged by classify
        self.ttft.observe(time.perf_counter() - t0, tags={"kind": "image" if stream.trim else "text"})
        self.requests.inc(tags={"status": "200"})
        return stream

    async def _respond(self, req, stream: DecoderStream, render):
        acc = Accumulator(req.n)
        if req.stream:
            return StreamingResponse(events(stream, acc, render, self.itl.observe), media_type="text/event-stream")
        return await collect(stream, acc, render, self.cfg.retry_after_s)

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.cfg.served_model_name):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.cfg.served_model_name!r}")

    # ---- the pipeline

    async def _start(self, req, rid: str, client, prepare) -> DecoderStream:
        """Admit (a place in the decoder pool's queue, else 503 at once: deployments/admission.py; GuardMiddleware
        took it before the body was read), preprocess (`prepare`: SamplingParams, PreparedPrompt, image keys) and
        send the request down the stages; the decoder stream from its first output (errors before the first token
        become HTTP statuses here, before any byte is sent). A replica lost before the first token: sent once more
        (another replica, or the replacement), then 503. The place is handed over when the decoder's engine has the
        request (the next report counts it), and given back at once if the request fails first."""
        self._check_model(req.model)
        place = await self._place(client)
        try:
            return await self._admitted(req, rid, client, prepare, place)
        except BaseException:
            place.release()
            raise

    async def _place(self, client):
        """The place GuardMiddleware took for this request (the first engine request of it to ask), else one taken
        now (a completions request's further prompts; no middleware)."""
        place = getattr(client, "place", None)
        if place is not None:
            delattr(client, "place")
            return place
        try:
            return await self.admission.admit()
        except NoRoom as exc:
            raise ApiError(503, str(exc), self.cfg.retry_after_s) from None

    async def _admitted(self, req, rid: str, client, prepare, place: Place) -> DecoderStream:
        try:
            params, prepared, keys = await prepare()
            trim_cfg = api.to_trim_config(req.trim, self.cfg.trim)
        except InvalidRequest as exc:
            raise ApiError.invalid(exc) from exc
        if trim_cfg.policy == "elastic" and prepared.num_images:  # the pool's pressure travels with the request
            trim_cfg = trim_cfg.model_copy(update={"pressure": await self.pressure.read()})
        params = api.fit_max_tokens(req, params, len(prepared.input_ids), self.cfg.engine.max_model_len)
        await self._hold_kv(client, params.n * (len(prepared.input_ids) + params.max_tokens))  # n worst cases
        stages = STAGES if prepared.num_images else TEXT_STAGES
        for attempt in (1, 2):
            # A stage with no running replica: wait a bounded while for one (a restart), then 503, rather than
            # letting Serve queue the request for as long as the replica is gone (its node may be dead).
            down = await self.watch.wait_up(stages, self.cfg.stage_wait_s)
            if down:
                raise ApiError(503, str(StageUnavailable(down)), self.cfg.retry_after_s)
            items = self._send(prepared, keys, params, trim_cfg, rid)
            try:
                trim, first = await self._head(items, stages, place)
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
                raise ApiError.of(error, self.cfg.retry_after_s) from exc
            if isinstance(first, StageError):
                if first.status == 503:  # refused by the decoder after the stages ran: what admission avoids
                    self.admission.refused_by_decoder(attempt * 2 if prepared.num_images else 0)
                raise ApiError.of(first, self.cfg.retry_after_s)
            return DecoderStream(items, first, trim)

    async def _head(self, items, stages, place: Place) -> tuple[TrimSummary | None, RequestOutput | StageError]:
        """The decoder's TrimSummary (image requests) and its first output or error, handing the place over at
        Queued (at the latest, at the first output); each wait ends if a stage stays down."""
        trim = None
        while isinstance(item := await self.watch.first(items, stages, self.cfg.stage_wait_s), TrimSummary | Queued):
            if isinstance(item, Queued):
                place.handed_over()
            else:
                trim = item
        if isinstance(item, RequestOutput):
            place.handed_over()
        return trim, item

    def _send(self, prepared: PreparedPrompt, keys: list[str], params: SamplingParams, trim_cfg, rid: str):
        """Chain the stages by handle: each stage's result goes to the next through the object store,
        never through this replica."""
        prepared = dataclasses.replace(prepared, cache_salt=params.cache_salt)  # the trimmer's prefix cache reads it
        handoff = run_stages(prepared, lambda p: self.encoder.encode.remote(p, keys),
                             lambda p, visual: self.trimmer.trim.remote(p, visual, trim_cfg), Handoff.of)
        return self.decoder.generate.remote(handoff, params, rid)

    async def _hold_kv(self, client, tokens: int) -> None:
        """Count the request's KV reservation against its key (released by the guard when the request ends)."""
        ledger = self.guard.ledger
        if not ledger.max_kv_bytes or not hasattr(client, "client_key"):
            return
        if self.kv_bytes_per_token is None:
            self.kv_bytes_per_token = await self.decoder_calls.kv_bytes_per_token.remote()
        nbytes = int(tokens * self.kv_bytes_per_token)
        if not ledger.hold_kv(client.client_key, nbytes):
            raise ApiError(429, "this API key holds its share of the decoder's KV; try again when a request ends",
                           self.cfg.retry_after_s)
        client.kv_bytes = getattr(client, "kv_bytes", 0) + nbytes
