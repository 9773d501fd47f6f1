"""FIFO admission by KV budget: a waiting sequence joins the running batch once its whole reservation fits."""

from collections import deque

from pipeline.config import EngineConfig
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.sequence import Sequence, Status
from pipeline.errors import InvalidRequest, Overloaded


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def check(self, seq: Sequence) -> None:
        """Refuse at once what could never run."""
        if seq.prompt_len + seq.params.max_tokens > self.cfg.max_model_len:
            raise InvalidRequest(
                f"prompt ({seq.prompt_len} tokens) + max_tokens ({seq.params.max_tokens}) exceeds "
                f"max_model_len {self.cfg.max_model_len}"
            )
        need = self.kv.bytes_needed(seq.self_tokens, seq.cross_tokens)
        if need > self.kv.capacity_bytes:
            raise InvalidRequest(f"request needs {need} bytes of KV; the whole budget is {self.kv.capacity_bytes}")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        if len(self.waiting) >= self.cfg.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already waiting; try again later")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences to running, in arrival order, while their KV fits."""
        admitted = []
        while self.waiting and len(self.running) < self.cfg.max_running:
            kv = self.kv.reserve(self.waiting[0].self_tokens, self.waiting[0].cross_tokens)
            if kv is None:
                break  # no skipping ahead: a large request is not starved by small ones
            seq = self.waiting.popleft()
            seq.kv, seq.status = kv, Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free the sequence's KV at once, wherever it is."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq.kv)
            seq.kv = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
