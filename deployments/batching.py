"""Serve batching for the stage deployments: the YAML's batch size and wait applied to a `@serve.batch` method, the
sizes of the batches that formed (a Prometheus histogram and counts /stats can show), and a batch's per-call errors
raised in the call that owns them."""

from collections import Counter as Tally

from ray.serve.metrics import Histogram

from .config import StageBatching

BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


def apply_batching(method, batching: StageBatching) -> None:
    """In place, on a replica's bound `@serve.batch` method: the next batch formed uses the new values."""
    method.set_max_batch_size(batching.max_batch_size)
    method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)


def batching_of(method) -> dict:
    """The values a `@serve.batch` method forms its next batch with."""
    return {"max_batch_size": method._get_max_batch_size(), "batch_wait_timeout_s": method._get_batch_wait_timeout_s()}


def raised(result):
    """A batched call's own result; its own error (the others in its batch were answered) raised here."""
    if isinstance(result, Exception):
        raise result
    return result


class BatchSizes:
    """How many calls each forward served."""

    def __init__(self, name: str, description: str):
        self.histogram = Histogram(name, description=description, boundaries=BATCH_SIZE_BOUNDARIES)
        self.counts: Tally[int] = Tally()

    def observe(self, size: int) -> None:
        self.histogram.observe(size)
        self.counts[size] += 1

    def stats(self) -> dict:
        """{"batches": n, "calls": n, "largest": n, "sizes": {size: batches}}."""
        return {"batches": sum(self.counts.values()), "calls": sum(k * n for k, n in self.counts.items()),
                "largest": max(self.counts, default=0), "sizes": dict(sorted(self.counts.items()))}
