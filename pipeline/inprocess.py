"""The three stages in one process: encode -> trim -> decode, for the CLI, tests and offline use."""


from PIL import Image

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.sequence import Sequence
from pipeline.model.encoder import VisionEncoder
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.loader import LoadedModel, load_model
from pipeline.model.trimmer import Trimmer
from pipeline.types import Generation, PreparedPrompt, TrimResult


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

    def trim(self, prepared: PreparedPrompt, trim: TrimConfig | None = None) -> TrimResult | list[int]:
        """A TrimResult for a prompt with images; the token ids of a text-only one (it skips both stages)."""
        if prepared.num_images == 0:
            return prepared.input_ids.tolist()
        return self.trimmer.trim(prepared, self.encoder.encode(prepared), trim)

    def generate(self, prompt: str, images: list[Image.Image], params: SamplingParams | None = None,
                 trim: TrimConfig | None = None) -> Generation:
        source = self.trim(self.prepare(prompt, images), trim)
        params = params or SamplingParams()
        if self.fit_kv:
            self.fit_engine(source, params)
        (seq,) = self.engine.generate([source], params)
        return make_generation(seq, source)


    def fit_engine(self, source: TrimResult | list[int], params: SamplingParams) -> None:
        """Rebuild the engine with exactly the KV one request needs, when the current budget cannot hold it."""
        trim = source if isinstance(source, TrimResult) else None
        seq = Sequence("fit", trim.prompt_token_ids if trim else source, params, trim=trim)
        need = self.engine.kv.bytes_needed(seq.max_self_tokens, seq.cross_tokens)
        length = seq.prompt_len + params.max_tokens
        cfg = self.engine.cfg
        if need > self.engine.kv.capacity_bytes or length > cfg.max_model_len:
            self.engine = None  # free the old arena first
            self.engine = LLMEngine(self.loaded, cfg.model_copy(update={
                "kv_budget_bytes": max(need, cfg.kv_budget_bytes), "max_model_len": max(length, cfg.max_model_len)}))


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
