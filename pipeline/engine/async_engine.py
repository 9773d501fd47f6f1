"""AsyncLLMEngine: steps an LLMEngine on a background thread; every request is an async iterator of deltas, whose
text (detokenizing, stop strings) is made on the caller's event loop, off the step thread. The engine's state is
the step thread's alone: callers read the stats it publishes after each step, and an error escaping its loop fails
every stream and leaves the engine unhealthy (check_health raises) rather than hanging them."""

import asyncio
import logging
import queue
import threading

from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.output_processor import CompletionStream, stopped_by_text
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.stats import EngineStats
from pipeline.errors import EngineDead, Overloaded
from pipeline.types import DecodeRequest

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Steps the engine on a background thread; requests come and go as async iterators."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        # ("add", seq), ("abort", id), ("finish", (id, index)) or ("fault", exc): applied between steps
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stats = engine.stats()  # published by the step thread: nothing else iterates the engine's state
        self.error: BaseException | None = None  # what stopped the step loop; the engine serves nothing after it
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="crosstrim-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: DecodeRequest, params: SamplingParams, request_id: str | None = None,
                       ack: bool = False):
        """The request's RequestOutputs as its completions progress; with `ack`, None first, once the engine counts
        the request (its queue_room no longer offers the request's place: the ingress's admission waits for this)."""
        seq = self.engine.make_sequence(request, params, request_id)  # raises InvalidRequest at once
        del request  # the engine drops the big tensors after prefill; this frame must not pin them
        with self._lock:
            if not self.engine.has_room(self._pending):
                raise Overloaded("the decoder queue is full; try again later")
            self._pending += 1
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[seq.request_id] = (loop, q)
        if self.error is not None:  # after registering: a loop dying now either sees this stream or set the error
            self._streams.pop(seq.request_id, None)
            raise self._dead()
        self._inbox.put(("add", seq))
        self._wake.set()
        finished, done = False, 0
        streams = [CompletionStream(self.engine.tokenizer, params) for _ in range(params.n)]  # text, per completion
        try:
            if ack:  # None first: the request is in the engine's count now (queue_room no longer offers its place)
                yield None
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
        """The engine's stats as of its last step (or the last requests added or ended between steps)."""
        return self._stats

    def queue_room(self) -> int:
        """How many more requests generate() would queue now (0 once the engine has stopped)."""
        with self._lock:
            return 0 if self.error is not None else max(0, self.engine.queue_room(self._pending))

    def check_health(self) -> None:
        """Raise EngineDead if the step loop has stopped (what a Serve health check calls)."""
        if self.error is not None or not self._thread.is_alive():
            raise self._dead()

    def inject_fault(self, exc: BaseException) -> None:
        """The step thread raises `exc` between steps, as an error escaping its loop would (fire drills, tests)."""
        self._inbox.put(("fault", exc))
        self._wake.set()

    def _dead(self) -> EngineDead:
        cause = "it was shut down" if self.error is None else f"{type(self.error).__name__}: {self.error}"
        return EngineDead(f"the decoder engine stopped ({cause}); try again")

    def pressure(self) -> float:
        """The KV pressure elastic trimming reads, from the stats the step thread published (no cross-thread reads)."""
        return self._stats.kv_pressure

    def kv_bytes_per_token(self) -> float:
        return self.engine.kv_bytes_per_token()

    def set_limits(self, max_running: int, max_waiting: int) -> None:
        self.engine.set_limits(max_running, max_waiting)

    def prefix_digest(self) -> dict | None:
        return self.engine.prefix_digest()

    async def reset_prefix_cache(self) -> int:
        """LLMEngine.reset_prefix_cache on the step thread (between steps); the pages the cache held."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("reset", lambda n: loop.call_soon_threadsafe(done.set_result, n)))
        self._wake.set()
        return await done

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
            if kind == "fault":
                raise item
            if kind == "reset":
                item(self.engine.reset_prefix_cache())
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
            try:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, item)
            except RuntimeError:  # its event loop has closed: nobody is listening any more
                pass

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, no stream may hang on a dead loop
            self._die(exc)

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_work():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step_tokens()
            except Exception as exc:  # the step failed outside any one sequence's guard: never hang, never hold KV
                log.exception("engine step failed (%s); failing the %d requests in flight", type(exc).__name__,
                              self.engine.num_requests)
                outputs = self.engine.fail_all(exc)  # if this raises too, the loop dies (_die)
            self._stats = self.engine.stats()
            for out in outputs:
                self._deliver(out.request_id, out)

    def _die(self, exc: BaseException) -> None:
        """The loop is gone: every stream (running, waiting or still in the inbox) ends with EngineDead at once, and
        check_health raises from now on so the replica is replaced. The engine's state is not trusted any more."""
        self.error = exc
        log.critical("the engine's step loop died; failing its %d streams", len(self._streams), exc_info=exc)
        dead = self._dead()
        for request_id in list(self._streams):
            self._deliver(request_id, dead)
