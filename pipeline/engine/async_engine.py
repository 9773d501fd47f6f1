"""AsyncLLMEngine: steps an LLMEngine on a background thread; every request is an async iterator of deltas, whose
text (detokenizing, stop strings) is made on the caller's event loop, off the step thread."""

import asyncio
import logging
import queue
import threading

from pipeline.engine.llm_engine import EngineStats, LLMEngine
from pipeline.engine.output_processor import CompletionStream, stopped_by_text
from pipeline.engine.sampling import SamplingParams
from pipeline.errors import Overloaded
from pipeline.types import DecodeRequest

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Steps the engine on a background thread; requests come and go as async iterators."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        # ("add", seq), ("abort", id) or ("finish", (id, index)): applied between steps
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="crosstrim-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: DecodeRequest, params: SamplingParams, request_id: str | None = None):
        seq = self.engine.make_sequence(request, params, request_id)  # raises InvalidRequest at once
        del request  # the engine drops the big tensors after prefill; this frame must not pin them
        with self._lock:
            if not self.engine.has_room(self._pending):
                raise Overloaded("the decoder queue is full; try again later")
            self._pending += 1
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[seq.request_id] = (loop, q)
        self._inbox.put(("add", seq))
        self._wake.set()
        finished, done = False, 0
        streams = [CompletionStream(self.engine.tokenizer, params) for _ in range(params.n)]  # text, per completion
        try:
            while not finished:
                step = await q.get()
                if isinstance(step, BaseException):
                    raise step
                out = streams[step.index].add(step)
                if out is None:
                    continue  # sampled before the engine heard that a stop string ended this completion
                if stopped_by_text(step, out):
                    self._inbox.put(("finish", (seq.request_id, step.index)))
                    self._wake.set()
                if out.finished and seq.image is not None:  # what shedding left it (docs/elastic.md)
                    finisher = seq if step.index == 0 else seq.siblings[step.index - 1]
                    out.kept_tokens_end, out.shed_at = finisher.cross_tokens, finisher.shed_at
                done += out.finished
                finished = done == params.n  # every one of the n completions
                yield out
        finally:
            self._streams.pop(seq.request_id, None)
            if not finished:  # the consumer went away: free its KV at once
                self._inbox.put(("abort", seq.request_id))
                self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def pressure(self) -> float:
        return self.engine.pressure()

    def kv_bytes_per_token(self) -> float:
        return self.engine.kv_bytes_per_token()

    def set_limits(self, max_running: int, max_waiting: int) -> None:
        self.engine.set_limits(max_running, max_waiting)

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
            if kind == "finish":
                self.engine.finish_completion(*item)
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
                outputs = self.engine.step_tokens()
            except Exception as exc:  # the step failed outside any one sequence's guard: never hang, never hold KV
                log.exception("engine step failed (%s); failing the %d requests in flight", type(exc).__name__,
                              self.engine.num_requests)
                outputs = self.engine.fail_all(exc)
            for out in outputs:
                self._deliver(out.request_id, out)
