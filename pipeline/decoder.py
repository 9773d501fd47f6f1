"""The three stages in one process: encode -> trim -> decode, for the CLI, tests and offline use."""

from dataclasses import dataclass

from PIL import Image

from .config import EngineConfig, ModelConfig, TrimConfig
from .encoder import VisionEncoder
from .engine import LLMEngine
from .inputs import PreparedPrompt, prepare_prompt, user_message
from .loader import LoadedModel, load_model
from .sampling import SamplingParams
from .sequence import Sequence
from .trimmer import Trimmer, TrimResult


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    visual_tokens: int
    kept_tokens: int
    cross_kv_bytes: int
    cross_kv_bytes_full: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Decoder:
    """Resumes sequences from TrimResults (or text-only prompts) and generates; the engine underneath."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None):
        self.engine = LLMEngine(loaded, cfg)

    def generate(self, sources: list, params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        return self.engine.generate(sources, params)


class Pipeline:
    """VisionEncoder -> Trimmer -> Decoder over one loaded model."""

    def __init__(self, model: ModelConfig | LoadedModel | None = None, trim: TrimConfig | None = None,
                 engine: EngineConfig | None = None):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.encoder = VisionEncoder(self.loaded)
        self.trimmer = Trimmer(self.loaded, trim)
        self.decoder = Decoder(self.loaded, engine)

    def prepare(self, prompt: str, images: list[Image.Image]) -> PreparedPrompt:
        cfg = self.loaded.cfg
        return prepare_prompt(self.loaded.processor, user_message(prompt, len(images)), images,
                              cfg.max_images, cfg.max_prompt_tokens)

    def trim(self, prepared: PreparedPrompt, trim: TrimConfig | None = None) -> TrimResult | list[int]:
        """A TrimResult for a prompt with images; the token ids of a text-only one (it skips both stages)."""
        if prepared.num_images == 0:
            return prepared.input_ids.tolist()
        return self.trimmer.trim(prepared, self.encoder.encode(prepared), trim)

    def generate(self, prompt: str, images: list[Image.Image], params: SamplingParams | None = None,
                 trim: TrimConfig | None = None) -> Generation:
        source = self.trim(self.prepare(prompt, images), trim)
        (seq,) = self.decoder.generate([source], params or SamplingParams())
        return make_generation(seq, source)


def make_generation(seq: Sequence, source: TrimResult | list[int]) -> Generation:
    is_trim = isinstance(source, TrimResult)
    return Generation(
        text=seq.text,
        token_ids=list(seq.output_ids),  # every sampled token, a final EOS included (as HF generate returns)
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.prompt_len,
        visual_tokens=sum(source.visual_tokens) if is_trim else 0,
        kept_tokens=sum(source.kept_tokens) if is_trim else 0,
        cross_kv_bytes=source.cross_kv_bytes if is_trim else 0,
        cross_kv_bytes_full=source.cross_kv_bytes_full if is_trim else 0,
    )
