"""What DecoderPool.generate yields to the ingress: a TrimSummary first (image requests), Queued, RequestOutputs, a
StageError."""

from dataclasses import asdict, dataclass

from pipeline.types import RequestOutput


@dataclass(frozen=True)
class TrimSummary:
    """What trimming did to one request and what its hand-off cost; the response's `trim` object."""

    visual_tokens: int
    kept_tokens: int
    kept_ratio: float
    cross_kv_bytes: int  # what the decoder holds for this request
    cross_kv_bytes_full: int  # what it would hold untrimmed
    ship: str  # "kv" or "features"
    shipped_bytes: int  # every tensor byte of the hop, resume state included
    shipped_cross_bytes: int  # the visual part of it
    hop_ms: float  # trimmer sent -> decoder received, wall clock
    # elastic trimming (docs/elastic.md): the kept fraction chosen, the pool's KV pressure it was chosen at, and the
    # floor the decoder may shed it down to; None for the fixed policies
    chosen_fraction: float | None = None
    pressure: float | None = None
    floor_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Queued:
    """The decoder's engine has the request: its reports count it from now on (the ingress gives back its place)."""


@dataclass(frozen=True)
class StageError:
    """A stage's failure as a client sees it (status, message, never internals); also what `faults.classify` returns."""

    status: int
    message: str
    retryable: bool = False  # the replica was lost: sending the request again may succeed


# The decoder's stream: [TrimSummary] [Queued] RequestOutput* [StageError]. Queued comes before any RequestOutput
# (a request refused before the engine took it gets none); a StageError ends the stream; RequestOutput.error is
# never set in it (the decoder turns an engine failure into a StageError).
DecoderItem = TrimSummary | Queued | RequestOutput | StageError
