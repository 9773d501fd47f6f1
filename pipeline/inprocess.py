"""The three stages in one process: encode -> trim -> decode, for the CLI, tests and offline use."""

from functools import partial

from PIL import Image

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.sequence import Sequence
from pipeline.model.encoder import VisionEncoder
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.loader import LoadedModel, load_model
from pipeline.model.trimmer import Trimmer
from pipeline.orchestration import run_stages, run_stages_batched
from pipeline.types import DecodeRequest, Generation, PreparedPrompt


class Pipeline:
    """VisionEncoder -> Trimmer -> LLMEngine over one loaded model."""

    def __init__(self, model: ModelConfig | LoadedModel | None = None, trim: TrimConfig | None = None,
                 engine: EngineConfig | None = None, fit_kv: bool = False):
        """fit_kv: size the engine's KV budget (and max_model_len) for each request generate() runs, as the CLI
        does for its one request; otherwise `engine`'s budget holds and a request beyond it is refused."""
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.fit_kv = fit_kv
        self.encoder = VisionEncoder(self.loaded)
        self.trimmer = Trimmer(self.loaded, trim)
        self.engine = LLMEngine(self.loaded, engine)

    def prepare(self, prompt: str, images: list[Image.Image]) -> PreparedPrompt:
        cfg = self.loaded.cfg
        return prepare_prompt(self.loaded.processor, user_message(prompt, len(images)), images,
                              cfg.max_images, cfg.max_prompt_tokens)

    def trim(self, prepared: PreparedPrompt, trim: TrimConfig | None = None, ship: str = "kv") -> DecodeRequest:
        """The decode request of a prepared prompt: encoded and trimmed when it has images."""
        return run_stages(prepared, self.encoder.encode, partial(self.trimmer.trim, cfg=self.with_pressure(trim),
                                                                 ship=ship))

    def trim_many(self, prepared: list[PreparedPrompt], trim: TrimConfig | None = None,
                  ship: str = "kv") -> list[DecodeRequest | Exception]:
        """trim() of many prompts, each stage run once over all of them (results equal one at a time); a prompt
        that fails gets its exception in its place, the others their decode requests."""
        trim = self.with_pressure(trim)
        return run_stages_batched(prepared, self.encoder.encode_batch,
                                  lambda prompts, visuals: self.trimmer.trim_batch(prompts, visuals, [trim] * len(prompts), ship))

    def with_pressure(self, trim: TrimConfig | None) -> TrimConfig:
        """An elastic policy reads this engine's KV pressure now, unless the caller fixed one (docs/elastic.md)."""
        trim = trim or self.trimmer.cfg
        if trim.policy != "elastic" or trim.pressure is not None:
            return trim
        return trim.model_copy(update={"pressure": self.engine.pressure()})

    def generate(self, prompt: str, images: list[Image.Image], params: SamplingParams | None = None,
                 trim: TrimConfig | None = None) -> Generation:
        request = self.trim(self.prepare(prompt, images), trim)
        params = params or SamplingParams()
        if self.fit_kv:
            self.fit_engine(request, params)
        (seq,) = self.engine.generate([request], params)
        return make_generation(seq)

    def fit_engine(self, request: DecodeRequest, params: SamplingParams) -> None:
        """Rebuild the engine with exactly the KV one request needs, when the current budget cannot hold it."""
        need = self.engine.kv_bytes_for(request, params)
        length = request.prompt_len + params.max_tokens
        cfg = self.engine.cfg
        if need > self.engine.kv_budget_bytes or length > cfg.max_model_len:
            self.engine = None  # free the old arena first
            self.engine = LLMEngine(self.loaded, cfg.model_copy(update={
                "kv_budget_bytes": max(need, cfg.kv_budget_bytes), "max_model_len": max(length, cfg.max_model_len)}))


def make_generation(seq: Sequence) -> Generation:
    image = seq.image
    return Generation(
        text=seq.text,
        token_ids=list(seq.output_ids),  # every sampled token, a final EOS included (as HF generate returns)
        finish_reason=seq.finish_reason,
        prompt_tokens=seq.prompt_len,
        visual_tokens=sum(image.visual_tokens) if image else 0,
        kept_tokens=sum(image.kept_tokens) if image else 0,
        cross_kv_bytes=image.cross_kv_bytes if image else 0,
        cross_kv_bytes_full=image.cross_kv_bytes_full if image else 0,
    )
