"""Stage 1, VisionEncoder: image tiles -> projected visual features, as MllamaModel.forward computes them."""


import torch

from pipeline.model.loaded import LoadedModel
from pipeline.types import PreparedPrompt, VisualFeatures


class VisionEncoder:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.vision = loaded.model.model.vision_model
        self.projector = loaded.model.model.multi_modal_projector

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
