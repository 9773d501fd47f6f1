"""Stage 1, VisionEncoder: image tiles -> projected visual features, as MllamaModel.forward computes them with
the intermediate layers tapped at their input (Meta's reference; transformers 5 taps their output)."""


import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama.modeling_mllama import (
    MllamaVisionEncoder,
    MllamaVisionMLP,
)

from pipeline.model.loaded import LoadedModel
from pipeline.types import PreparedPrompt, VisualFeatures


class TappedVisionEncoder(MllamaVisionEncoder):
    """HF's vision encoder tapping each of `taps` at its INPUT, as Meta's reference does, keeping nothing else.

    llama-models' VisionEncoder (`return_intermediate`) appends x before layer idx runs, and transformers 4.x
    (PR #40083) did the same; transformers 5.24's forward appends each layer's output, so MllamaVisionModel,
    reading `hidden_states[i]` for i in `intermediate_layers_indices`, gets one layer late. HF also keeps every
    layer's output (32 x (tiles * 1,608, 1,280) for the 11B: 0.5 GiB in bf16 for a 4-tile image) where 5 are
    read from the local encoder and none from the global one. The layers and their arithmetic are HF's."""

    taps: frozenset[int] = frozenset()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        kept: list[torch.Tensor | None] = []  # indexed by layer as HF's tuple is; None where nobody reads it
        for i, layer in enumerate(self.layers):
            kept.append(hidden_states if i in self.taps else None)  # layer i's input
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(kept))


def tap_layer_inputs(vision) -> None:
    """Swap HF's encoders' class in place (same modules, weights and names) so `vision` (an MllamaVisionModel)
    reads each intermediate layer at its input: the features Llama-3.2-Vision was trained on. Idempotent."""
    for encoder, taps in ((vision.transformer, vision.intermediate_layers_indices), (vision.global_transformer, ())):
        if type(encoder) is MllamaVisionEncoder:
            encoder.__class__ = TappedVisionEncoder
            encoder.taps = frozenset(taps)


class RowChunkedVisionMLP(MllamaVisionMLP):
    """HF's vision MLP over ROWS tokens at a time: the (tokens, 5,120) intermediate is the tower's largest
    activation (2 x 132 MB in fp32 for a 4-tile image, GELU not in place); rows are independent."""

    ROWS = 2048

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-2] <= self.ROWS:
            return super().forward(hidden_states)
        return torch.cat([super(RowChunkedVisionMLP, self).forward(part)
                          for part in hidden_states.split(self.ROWS, dim=-2)], dim=-2)


def lighten(vision) -> None:
    """Swap classes in place (same modules, weights and names): the two encoders tap per the reference and keep
    only what MllamaVisionModel reads, and every MLP runs in row chunks."""
    tap_layer_inputs(vision)
    for encoder in (vision.transformer, vision.global_transformer):
        for layer in encoder.layers:
            if type(layer.mlp) is MllamaVisionMLP:
                layer.mlp.__class__ = RowChunkedVisionMLP


class VisionEncoder:
    def __init__(self, loaded: LoadedModel, images_per_forward: int | None = None):
        """images_per_forward: the most images one tower call stacks; default one on CPU, where a tower's cost is per
        image and stacking more only grew the working set (HF builds a (tokens x tokens) mask per image, 67 MB at 4
        tiles of 448 px): measured slower (BENCHMARKS.md, batched encode and trim); 16 on a GPU, where one call
        over many images fills the device."""
        self.loaded = loaded
        self.images_per_forward = images_per_forward or (16 if loaded.device.type == "cuda" else 1)
        self.vision = loaded.model.model.vision_model
        self.projector = loaded.model.model.multi_modal_projector
        lighten(self.vision)

    def encode(self, prompt: PreparedPrompt) -> VisualFeatures:
        return self.encode_batch([prompt])[0]

    @torch.inference_mode()
    def encode_batch(self, prompts: list[PreparedPrompt]) -> list[VisualFeatures]:
        """Every prompt's images through the tower, stacked up to images_per_forward a call, per tile shape. HF
        flattens (batch, images) into one axis and treats each image alone (its own tiles, aspect ratio and
        padding-tile mask), so the prompts' images are stacked on the images axis: no padding images, and each
        image's numbers are those of a batch of one (the processor pads every image to max_num_tiles, so one shape
        is the rule)."""
        out: list[VisualFeatures | None] = [None] * len(prompts)
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            by_shape.setdefault(tuple(p.pixel_values.shape[2:]), []).append(i)
        for group in by_shape.values():
            for chunk in self._chunks(group, prompts):
                for i, visual in zip(chunk, self._encode_stacked([prompts[i] for i in chunk])):
                    out[i] = visual
        return out

    def _chunks(self, group: list[int], prompts: list[PreparedPrompt]) -> list[list[int]]:
        """Consecutive prompts of `group` with at most images_per_forward images a chunk (a prompt with more than
        that is a chunk of its own)."""
        chunks, images = [[]], 0
        for i in group:
            n = prompts[i].num_images
            if chunks[-1] and images + n > self.images_per_forward:
                chunks.append([])
                images = 0
            chunks[-1].append(i)
            images += n
        return chunks

    def _encode_stacked(self, prompts: list[PreparedPrompt]) -> list[VisualFeatures]:
        """Prompts whose images share one tile shape: one forward over all their images."""
        dev = self.loaded.device
        stacked = {name: torch.cat([getattr(p, name) for p in prompts], dim=1).to(dev)  # (1, all images, ...)
                   for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        out = self.vision(**stacked).last_hidden_state  # (1, images, tiles, patches, vision_output_dim)
        _, images, tiles, patches, _ = out.shape
        features = self.projector(out).reshape(images, tiles * patches, -1)
        if len(prompts) == 1:
            return [VisualFeatures(features=features, token_valid=prompts[0].token_valid(patches).to(dev))]
        parts = features.split([p.num_images for p in prompts])
        # Cloned: a view would pin (and Ray would ship) the whole batch's features with each prompt's.
        return [VisualFeatures(features=f.clone(), token_valid=p.token_valid(patches).to(dev))
                for p, f in zip(prompts, parts)]
