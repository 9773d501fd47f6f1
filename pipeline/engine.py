"""The decoder engine: continuous batching over the model runner, admission by KV budget, streaming.

`LLMEngine` is synchronous (add, step, abort); `AsyncLLMEngine` runs its steps on a background thread and
hands every request an async iterator of token deltas. Neither knows about Ray Serve.
"""

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from .config import EngineConfig
from .errors import Overloaded
from .kv_cache import KVCache
from .loader import LoadedModel
from .model_runner import ModelRunner
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .trimmer import TrimResult


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_used_bytes: int
    kv_budget_bytes: int
    tokens_generated: int
    steps: int
    last_step_ms: float
    last_batch_size: int
    decode_steps: int  # cumulative: the mean decode batch over a window is the ratio of two differences
    decode_rows: int


class LLMEngine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None):
        self.loaded = loaded
        self.cfg = cfg or EngineConfig()
        tc = loaded.text_config
        self.kv = KVCache(
            self.cfg.kv_budget_bytes, tc.num_hidden_layers, loaded.cross_layers, tc.num_key_value_heads,
            tc.hidden_size // tc.num_attention_heads, loaded.dtype, loaded.device,
        )
        self.scheduler = Scheduler(self.cfg, self.kv)
        self.runner = ModelRunner(loaded, self.kv)
        self.tokenizer = loaded.processor.tokenizer
        self.eos = set(loaded.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self.tokens_generated = self.steps = self.last_batch_size = self.decode_steps = self.decode_rows = 0
        self.last_step_ms = 0.0

    def make_sequence(self, source: TrimResult | list[int], params: SamplingParams,
                      request_id: str | None = None) -> Sequence:
        """A sequence from a TrimResult, or from prompt token ids for a text-only prompt; checked, not queued."""
        request_id = request_id or uuid.uuid4().hex
        if isinstance(source, TrimResult):
            seq = Sequence(request_id, source.prompt_token_ids, params, trim=source)
        else:
            seq = Sequence(request_id, source, params)
        self.scheduler.check(seq)
        return seq

    def add(self, seq: Sequence) -> Sequence:
        if seq.request_id in self.seqs:
            raise ValueError(f"duplicate request id {seq.request_id}")
        self.scheduler.add(seq)
        self.seqs[seq.request_id] = seq
        return seq

    def add_request(self, source, params: SamplingParams, request_id: str | None = None) -> Sequence:
        return self.add(self.make_sequence(source, params, request_id))

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[RequestOutput]:
        """Admit what fits and prefill it, then decode every other running sequence by one token."""
        t0 = time.perf_counter()
        outputs = []
        admitted = self.scheduler.admit()
        for seq in admitted:
            if seq.trim is not None and seq.trim.hidden.device != self.loaded.device:
                seq.trim = seq.trim.to(self.loaded.device)
            seq.generator = make_generator(seq.params, self.loaded.device)
            outputs.append(self._append(seq, self.runner.prefill(seq)))
            seq.trim = self._drop_resume_state(seq.trim)
        batch = [s for s in self.scheduler.running if s not in admitted]
        if batch:
            self.decode_steps += 1
            self.decode_rows += len(batch)
            logits = self.runner.decode(batch)
            outputs += [self._append(s, logits[i]) for i, s in enumerate(batch)]
        self.steps += 1
        self.last_batch_size = len(batch)
        self.last_step_ms = (time.perf_counter() - t0) * 1e3
        return outputs

    @staticmethod
    def _drop_resume_state(trim: TrimResult | None) -> TrimResult | None:
        """After the prefill only the small per-token metadata is read; let the big tensors go."""
        if trim is None:
            return None
        empty = trim.hidden.new_zeros(0)
        return TrimResult(**{**trim.__dict__, "self_kv": empty, "prefix_kv": empty, "cross_kv": empty,
                             "kept_features": None})

    def _append(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        token, logprob = sample(logits, seq.params, seq.generator)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        self.tokens_generated += 1
        new_ids, reason = [token], None
        if token in seq.params.stop_token_ids or (token in self.eos and not seq.params.ignore_eos):
            reason, new_ids = "stop", []  # the stop token itself is not part of the output
        else:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hit = [seq.text.find(s) for s in seq.params.stop if s and s in seq.text]
            if hit:
                seq.text, reason = seq.text[: min(hit)], "stop"
        if reason is None and len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
        new_text = ""
        # Hold back a trailing partial UTF-8 character; never re-send text already streamed.
        if (reason or not seq.text.endswith("\ufffd")) and seq.text.startswith(seq.emitted):
            new_text, seq.emitted = seq.text[len(seq.emitted) :], seq.text
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=new_text, finished=reason is not None,
            finish_reason=reason, prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids),
            logprobs=[logprob] if new_ids and seq.params.logprobs else [],
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_used_bytes=self.kv.used_bytes, kv_budget_bytes=self.kv.capacity_bytes,
            tokens_generated=self.tokens_generated, steps=self.steps, last_step_ms=self.last_step_ms,
            last_batch_size=self.last_batch_size, decode_steps=self.decode_steps, decode_rows=self.decode_rows,
        )

    def generate(self, sources: list, params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Offline: run every request to completion, continuously batched; sequences in input order."""
        params = params if isinstance(params, list) else [params] * len(sources)
        seqs = [self.add_request(src, p) for src, p in zip(sources, params)]
        while self.has_work():
            self.step()
        return seqs


class AsyncLLMEngine:
    """Steps the engine on a background thread; requests come and go as async iterators."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", seq) or ("abort", id), applied between steps
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="crosstrim-engine", daemon=True)
        self._thread.start()

    async def generate(self, source, params: SamplingParams, request_id: str | None = None):
        seq = self.engine.make_sequence(source, params, request_id)  # raises InvalidRequest at once
        del source  # the engine drops the big tensors after prefill; this frame must not pin them
        with self._lock:
            if len(self.engine.scheduler.waiting) + self._pending >= self.engine.cfg.max_waiting:
                raise Overloaded("the decoder queue is full; try again later")
            self._pending += 1
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[seq.request_id] = (loop, q)
        self._inbox.put(("add", seq))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(seq.request_id, None)
            if not finished:  # the consumer went away: free its KV at once
                self._inbox.put(("abort", seq.request_id))
                self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(item)
                continue
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add(item)
            except Exception as exc:  # Overloaded or a duplicate id: tell that one caller
                self._deliver(item.request_id, exc)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # never leave callers hanging or KV held: fail what was in flight
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"decoder step failed: {exc}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
