"""The engine's figures (EngineStats: what /stats, the metrics and the router read) and the KV pressure elastic
trimming follows, taken from the scheduler and the KV cache on the step thread."""

from dataclasses import dataclass

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.scheduler import Scheduler


def kv_pressure(sched: Scheduler, kv: KVCache) -> float:
    """Pages held plus the pages the queued requests' prompts and kept tokens and the preempted sequences need, over
    all pages (above 1: more is asked than fits); docs/elastic.md."""
    need = sum(kv.pages_needed(s.prompt_len, s.cross_tokens) * s.params.n for s in sched.waiting)
    need += sum(kv.pages_needed(s.num_tokens, s.cross_tokens) for s in sched.swapped)
    return round((kv.blocks.used + need) / max(kv.blocks.num_pages, 1), 4)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_used_bytes: int  # bytes of the KV pages held
    kv_budget_bytes: int  # bytes of every KV page
    kv_written_bytes: int  # bytes of K/V actually written in the held pages (utilisation = written / used)
    swapped: int  # preempted sequences waiting to resume
    swap_used_bytes: int  # host bytes their K/V holds (at most EngineConfig.swap_budget_bytes)
    preemptions: int
    sheds: int  # elastic: running sequences shed to their floor (docs/elastic.md)
    shed_tokens: int  # kept visual tokens those sheds dropped
    kv_pressure: float  # (pages held + pages queued and preempted sequences need) / pages: what elastic trimming reads
    tokens_generated: int
    steps: int
    last_step_ms: float
    last_batch_size: int
    decode_steps: int  # cumulative: the mean decode batch over a window is the ratio of two differences
    decode_rows: int
    prompt_rows_computed: int = 0  # cumulative prompt rows the prefill ran (cached rows are not run)
    prefix_cached_tokens: int = 0  # cumulative prompt rows taken from the prefix cache
    prefix_queried_tokens: int = 0  # cumulative prompt rows of admitted prompts (with the cache on)
    prefix_cached_pages: int = 0  # pages in the prefix cache now (held or not)
    prefix_unheld_pages: int = 0  # of which no sequence holds: free, evicted least recently used first
    prefix_evictions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cached_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @classmethod
    def of(cls, sched: Scheduler, kv: KVCache, **counters) -> "EngineStats":
        """The figures of a scheduler and its KV cache now, with the engine's own counters."""
        prefix = kv.prefix
        cache = {} if prefix is None else dict(
            prefix_cached_tokens=prefix.hit_tokens, prefix_queried_tokens=prefix.queried_tokens,
            prefix_cached_pages=prefix.cached_pages, prefix_unheld_pages=len(prefix.unheld),
            prefix_evictions=prefix.evictions)
        return cls(**cache, **counters, running=len(sched.running), waiting=len(sched.waiting),
                   kv_used_bytes=kv.used_bytes, kv_budget_bytes=kv.capacity_bytes,
                   kv_written_bytes=kv.written_bytes_held([s.pages for s in sched.running]),
                   swapped=len(sched.swapped), swap_used_bytes=sched.swap.used_bytes, preemptions=sched.preemptions,
                   sheds=sched.sheds, shed_tokens=sched.shed_tokens, kv_pressure=kv_pressure(sched, kv))
