"""What the trimmer hands the decoder through Ray's object store: the TrimResult and when it was sent."""

import time
from dataclasses import dataclass, field

import torch

from pipeline.types import TrimResult

from .stream import TrimSummary


@dataclass
class Handoff:
    """A TrimResult whose tensors travel as zero-copy buffers (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1)."""

    trim: TrimResult
    ship: str  # "kv" or "features"
    sent_at: float = field(default_factory=time.time)  # wall clock: the two replicas may be different processes

    @property
    def nbytes(self) -> int:
        """Every tensor byte crossing the hop (resume state included)."""
        return self.trim.nbytes

    @property
    def cross_bytes(self) -> int:
        """The visual part: kept tokens' cross K/V, or their features in "features" mode."""
        t = self.trim.kept_features if self.ship == "features" else self.trim.cross_kv
        return t.numel() * t.element_size()

    def summary(self, received_at: float) -> TrimSummary:
        trim = self.trim
        return TrimSummary(
            visual_tokens=sum(trim.visual_tokens),
            kept_tokens=sum(trim.kept_tokens),
            kept_ratio=round(trim.kept_fraction, 6),
            cross_kv_bytes=trim.cross_kv_bytes,
            cross_kv_bytes_full=trim.cross_kv_bytes_full,
            ship=self.ship,
            shipped_bytes=self.nbytes,
            shipped_cross_bytes=self.cross_bytes,
            hop_ms=round((received_at - self.sent_at) * 1e3, 3),
        )


def contiguous(trim: TrimResult) -> TrimResult:
    """Zero-copy serialization needs contiguous tensors (else Ray copies and warns)."""
    return trim.map_tensors(torch.Tensor.contiguous)
