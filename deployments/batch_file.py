"""OpenAI batch files for `crosstrim batch` (as vLLM's run_batch): JSONL lines `{custom_id, method, url, body}` read by
the ingress's own request models, preprocessing and renderers, the three stages in this process, and one output line
`{id, custom_id, response: {status_code, request_id, body}, error}` per input line, in input order.

It lives in deployments/ because it reuses the Serve layer's wire format (api, constraints, preprocess, chat,
completions), which pipeline/ may not import; `crosstrim batch` finds it through the `crosstrim.batch` entry point."""

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest
from pipeline.inprocess import Pipeline
from pipeline.storage import S3Settings, read_object, split_s3
from pipeline.types import DecodeRequest, PreparedPrompt

from . import api
from .chat import ChatRenderer, completion_id
from .completions import TextRenderer, text_completion_id
from .config import AppConfig
from .constraints import structured_output, tool_dicts
from .handoff import Handoff
from .preprocess import Preprocessor
from .responses import Accumulator, TokenBytes

# url -> (request model, the response's id maker)
ENDPOINTS = {"/v1/chat/completions": (api.ChatCompletionRequest, completion_id),
             "/v1/completions": (api.CompletionRequest, text_completion_id)}
CHUNK_LINES = 256  # lines prepared and decoded together (their images and K/V held at once)


@dataclass
class Line:
    """One input line and, once known, its output line's response or error."""

    custom_id: str | None
    url: str | None = None
    req: api.Sampling | None = None
    rid: str = ""
    status: int | None = None
    body: dict | None = None
    error: dict | None = None  # {code, message}: a line that never became a request
    params: SamplingParams | None = None
    request: DecodeRequest | None = None  # encoded and trimmed, until it goes into the engine
    acc: Accumulator | None = None
    render: ChatRenderer | TextRenderer | None = None

    def fail(self, status: int, message: str, param: str | None = None) -> None:
        self.status, self.body = status, api.error_body(status, message, param)

    @property
    def open(self) -> bool:
        return self.error is None and self.status is None

    def output(self) -> dict:
        response = None if self.status is None else {"status_code": self.status, "request_id": self.rid or None,
                                                     "body": self.body}
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": self.custom_id, "response": response,
                "error": self.error}


def parse_line(text: str) -> Line:
    """A line's envelope and body, validated as the endpoint validates its body; problems are recorded on the Line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Line(None, error={"code": "invalid_json", "message": f"the line is not JSON: {exc}"})
    if not isinstance(obj, dict):
        return Line(None, error={"code": "invalid_request", "message": "a line must be a JSON object"})
    custom_id = obj.get("custom_id")
    line = Line(custom_id if isinstance(custom_id, str) else None)
    problem = ("custom_id must be a string" if line.custom_id is None else
               f"method must be POST, not {obj.get('method')!r}" if obj.get("method", "POST") != "POST" else
               f"url must be one of {', '.join(ENDPOINTS)}, not {obj.get('url')!r}" if obj.get("url") not in ENDPOINTS
               else "body must be a JSON object" if not isinstance(obj.get("body"), dict) else None)
    if problem:
        line.error = {"code": "invalid_request", "message": problem}
        return line
    line.url = obj["url"]
    model, make_id = ENDPOINTS[line.url]
    line.rid = make_id()
    try:
        line.req = model.model_validate(obj["body"])
    except ValidationError as exc:
        line.status, line.body = 400, api.schema_error_body([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        return line
    if line.req.stream:
        line.fail(400, "stream: a batch file's responses are whole bodies; send stream: false or leave it out",
                  "stream")
    return line


def s3_buckets(lines: list[Line]) -> list[str]:
    """The buckets the file's image URLs name: an offline job reads the images its owner points at."""
    found = set()
    for line in lines:
        for m in getattr(line.req, "messages", None) or []:
            for part in m.content if isinstance(m.content, list) else []:
                url = getattr(getattr(part, "image_url", None), "url", "")
                if url.startswith("s3://"):
                    found.add(split_s3(url)[0])
    return sorted(found)


class BatchFileRunner:
    """The ingress's preprocessing and renderers over an in-process Pipeline: a line's body gets the response body
    the chat or completions endpoint gives it (greedy tokens equal; ids and timestamps are new)."""

    def __init__(self, cfg: AppConfig, pipeline: Pipeline | None = None):
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg)
        self.token_bytes = TokenBytes(self.preprocessor.tokenizer)
        self.pipeline = pipeline or Pipeline(cfg.model, cfg.trim, cfg.engine)

    def run(self, lines: list[Line]) -> list[dict]:
        for start in range(0, len(lines), CHUNK_LINES):
            chunk = lines[start:start + CHUNK_LINES]
            asyncio.run(self._prepare_all(chunk))
            self._decode([line for line in chunk if line.open])
        return [line.output() for line in lines]

    async def _prepare_all(self, lines: list[Line]) -> None:
        await asyncio.gather(*(self._prepare(line) for line in lines if line.open))

    async def _prepare(self, line: Line) -> None:
        """What Ingress._start does before the stages: model check, SamplingParams, the prompt; then encode + trim."""
        req = line.req
        if req.model not in (None, self.cfg.served_model_name):
            line.fail(404, f"model {req.model!r} does not exist; this server serves {self.cfg.served_model_name!r}")
            return
        try:
            params = api.to_sampling_params(req, self.cfg.default_max_tokens, structured_output(req))
            if isinstance(req, api.Chat):
                prepared, _ = await self.preprocessor.prepare(req.messages, tool_dicts(req))
            else:
                if len(req.prompts) > 1:  # the endpoint's several prompts are several engine requests
                    raise InvalidRequest("a batch line holds one prompt; give each prompt a line of its own",
                                         param="prompt")
                prepared, _ = await self.preprocessor.prepare_text(req.prompts[0])
            trim_cfg = api.to_trim_config(req.trim, self.cfg.trim)
            line.params = api.fit_max_tokens(req, params, len(prepared.input_ids), self.cfg.engine.max_model_len)
            line.request = await asyncio.to_thread(self._stages, prepared, trim_cfg)
        except InvalidRequest as exc:
            line.fail(400, str(exc), exc.param)

    def _stages(self, prepared: PreparedPrompt, trim_cfg):
        return self.pipeline.trim(prepared, trim_cfg, self.cfg.ship)

    def _decode(self, lines: list[Line]) -> None:
        """Every line's request in one continuous-batching engine, stepped until all are done; a line the engine
        refuses or fails gets its error, the others go on."""
        engine, pending, running = self.pipeline.engine, [], {}
        for line in lines:
            request, line.request = line.request, None
            try:
                seq = engine.make_sequence(request, line.params, request_id=line.rid)
            except InvalidRequest as exc:
                line.fail(400, str(exc), exc.param)
                continue
            trim = Handoff.of(request).summary(request, received_at=0.0) if request.image is not None else None
            line.acc, line.render = Accumulator(line.req.n), self._renderer(line, trim)
            pending.append((line, seq))
        pending.reverse()
        try:
            while pending or engine.has_work():
                while pending and engine.has_room():
                    line, seq = pending.pop()
                    running[line.rid] = line
                    engine.add(seq)
                for out in engine.step():
                    line = running[out.request_id]
                    if out.error is not None:  # this request alone failed in the engine (as the decoder answers)
                        line.fail(500, f"the decoder failed on request {line.rid}")
                        engine.abort(line.rid)
                    elif line.open:
                        line.acc.add(out)
        except Exception:  # a failed step: what was in flight fails, the lines not yet started too
            engine.abort_all()
            for line in [*running.values(), *(line for line, _ in pending)]:
                if line.open and not (line.acc and line.acc.done):
                    line.fail(500, f"the decoder failed on request {line.rid}")
        for line in running.values():
            if line.open:
                line.status, line.body = 200, line.render.body(line.acc)

    def _renderer(self, line: Line, trim):
        model = self.cfg.served_model_name
        if isinstance(line.req, api.Chat):
            return ChatRenderer(line.req, line.rid, model, trim, self.token_bytes)
        return TextRenderer(line.req, line.rid, model, self.token_bytes)


# ---------------------------------------------------------------------------------------------- files and the CLI

def read_text(uri: str) -> str:
    if uri.startswith("s3://"):
        return read_object(S3Settings.from_env().client(), uri, "batch input").decode("utf-8")
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise InvalidRequest(f"batch input {uri!r} does not exist")
    return path.read_text(encoding="utf-8")


def write_text(uri: str, text: str) -> None:
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        S3Settings.from_env().client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))
        return
    path = Path(uri.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def run_file(cfg: AppConfig, input_uri: str, output_uri: str, pipeline: Pipeline | None = None) -> dict:
    """Read, run and write one batch file; blank lines are not requests (a trailing newline adds none)."""
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InvalidRequest(f"output {output_uri!r} is the input; the output is replaced on each run")
    lines = [parse_line(text) for text in read_text(input_uri).splitlines() if text.strip()]
    cfg = cfg.model_copy(update={"s3_buckets": sorted({*cfg.s3_buckets, *s3_buckets(lines)})})
    out = BatchFileRunner(cfg, pipeline).run(lines)
    write_text(output_uri, "".join(json.dumps(o, separators=(",", ":")) + "\n" for o in out))
    ok = sum(o["response"] is not None and o["response"]["status_code"] == 200 for o in out)
    return {"lines": len(out), "ok": ok, "errors": len(out) - ok}


def run(batch_cfg, args) -> int:
    """`crosstrim batch --input FILE.jsonl`: the batch config's model, trimming and engine; its sampling.max_tokens
    is the default of a body that names none."""
    cfg = AppConfig(model=batch_cfg.model, trim=batch_cfg.trim, engine=batch_cfg.engine,
                    default_max_tokens=batch_cfg.sampling.max_tokens,
                    **({"served_model_name": args.served_model_name} if args.served_model_name else {}))
    summary = run_file(cfg, args.input, args.output)
    print(f"crosstrim batch: {summary['lines']} lines, {summary['ok']} ok, {summary['errors']} errors "
          f"-> {args.output}", flush=True)
    return 0
