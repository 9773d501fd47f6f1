"""Stage 1, VisionEncoder: image tiles -> projected visual features, as MllamaModel.forward computes them."""


import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama.modeling_mllama import MllamaVisionEncoder

from pipeline.model.loaded import LoadedModel
from pipeline.types import PreparedPrompt, VisualFeatures


class TappedVisionEncoder(MllamaVisionEncoder):
    """HF's vision encoder keeping only the layer outputs its caller reads.

    HF's forward keeps every layer's output (32 x (tiles * 1,608, 1,280) for the 11B: 0.5 GiB in bf16 for a
    4-tile image), of which MllamaVisionModel reads 5 (`intermediate_layers_indices`) from the local encoder and
    none from the global one. The layers and their arithmetic are HF's; only what is kept differs."""

    taps: frozenset[int] = frozenset()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        kept: list[torch.Tensor | None] = []  # indexed by layer as HF's tuple is; None where nobody reads it
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
            kept.append(hidden_states if i in self.taps else None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(kept))


def tap_only_read_layers(vision) -> None:
    """Swap the class of the vision model's two encoders in place (same modules, same weights, same names)."""
    for encoder, taps in ((vision.transformer, vision.intermediate_layers_indices), (vision.global_transformer, ())):
        if type(encoder) is MllamaVisionEncoder:
            encoder.__class__ = TappedVisionEncoder
            encoder.taps = frozenset(taps)


class VisionEncoder:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.vision = loaded.model.model.vision_model
        self.projector = loaded.model.model.multi_modal_projector
        tap_only_read_layers(self.vision)

    @torch.inference_mode()
    def encode(self, prompt: PreparedPrompt) -> VisualFeatures:
        dev = self.loaded.device
        out = self.vision(
            pixel_values=prompt.pixel_values.to(dev),
            aspect_ratio_ids=prompt.aspect_ratio_ids.to(dev),
            aspect_ratio_mask=prompt.aspect_ratio_mask.to(dev),
        ).last_hidden_state  # (1, images, tiles, patches, vision_output_dim)
        _, images, tiles, patches, _ = out.shape
        features = self.projector(out).reshape(images, tiles * patches, -1)
        return VisualFeatures(features=features, token_valid=prompt.token_valid(patches).to(dev))
