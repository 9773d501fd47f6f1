"""What crosses the Serve hop to the decoder: a decode request's payload and when it was sent."""

import time
from dataclasses import dataclass, field

import torch

from pipeline.types import DecodeRequest, Payload

from .stream import TrimSummary


@dataclass
class Handoff:
    """A decode request as tensors plus plain fields; the tensors travel as zero-copy buffers
    (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1), so they are made contiguous first (else Ray copies and warns)."""

    payload: Payload
    sent_at: float = field(default_factory=time.time)  # wall clock: the two replicas may be different processes

    @classmethod
    def of(cls, request: DecodeRequest) -> "Handoff":
        return cls(request.to_payload().map_tensors(torch.Tensor.contiguous))

    def request(self) -> DecodeRequest:
        return DecodeRequest.from_payload(self.payload)

    @property
    def nbytes(self) -> int:
        """Every tensor byte crossing the hop (resume state included)."""
        return self.payload.nbytes

    @property
    def cross_bytes(self) -> int:
        """The visual part: the kept tokens' cross K/V, or their features (ship "features")."""
        t = self.payload.tensors.get("resume.cross")
        return 0 if t is None else t.numel() * t.element_size()

    def summary(self, request: DecodeRequest, received_at: float) -> TrimSummary:
        """The trim summary the stream opens with (`request` is this hand-off's, with an image)."""
        image = request.image
        return TrimSummary(
            visual_tokens=sum(image.visual_tokens),
            kept_tokens=sum(image.kept_tokens),
            kept_ratio=round(image.kept_fraction, 6),
            cross_kv_bytes=image.cross_kv_bytes,  # what the decoder holds for this request
            cross_kv_bytes_full=image.cross_kv_bytes_full,  # what it would hold untrimmed
            ship=request.resume.ship,
            shipped_bytes=self.nbytes,
            shipped_cross_bytes=self.cross_bytes,
            hop_ms=round((received_at - self.sent_at) * 1e3, 3),
            chosen_fraction=image.chosen_fraction,
            pressure=image.pressure,
            floor_tokens=image.floor_tokens,
        )
