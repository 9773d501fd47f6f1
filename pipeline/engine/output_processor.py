"""Output processing, off the engine's step: what a step sampled for each completion (host values) becomes a
RequestOutput with its text. Incremental detokenizing, stop strings, a held-back partial UTF-8 character and the
stream's deltas happen here; a completion a stop string ended is ended here, and whoever runs this tells the engine
to finish that sequence (as vLLM V1's OutputProcessor aborts a request that hit a stop string)."""

from dataclasses import dataclass, field

from pipeline.engine.detokenizer import IncrementalDetokenizer
from pipeline.engine.sampling import SamplingParams
from pipeline.types import PromptLogprob, RequestOutput


@dataclass
class StepToken:
    """One completion's result of one engine step, in host values: its sampled token, or how the engine ended it."""

    request_id: str
    index: int  # which of the request's n completions
    params: SamplingParams
    prompt_tokens: int
    completion_tokens: int  # tokens the engine sampled for it, this step's included
    token_ids: list[int]  # this step's token; empty for a stop token (not part of the output) or a failure
    finish_reason: str | None = None  # the engine's end: "stop" (a stop token), "length", "error"
    logprob: float = 0.0  # log p(token), when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None  # the exception's name, with finish_reason "error"
    prompt_logprobs: list[PromptLogprob | None] | None = None  # on completion 0's first step, when the request asked
    stop_token_id: int | None = None  # the stop token that ended it (not in token_ids; its logprob is `logprob`)
    cached_tokens: int = 0  # prompt rows taken from the prefix cache


class CompletionStream:
    """The text of one completion as its step tokens arrive; ends at the engine's finish or at a stop string."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.params = params
        self.ids: list[int] = []  # the output's tokens (a stop token excluded)
        self.detok = IncrementalDetokenizer(tokenizer, params.stop, params.min_tokens)
        self.emitted = 0  # characters of the text already streamed
        self.finished = False

    @property
    def text(self) -> str:
        return self.detok.text

    def add(self, step: StepToken) -> RequestOutput | None:
        """The output for this step; None once the completion has ended (tokens the engine sampled before it
        learnt of a stop string are dropped)."""
        if self.finished:
            return None
        reason = step.finish_reason
        if reason == "stop":  # a stop token: the text so far is final
            self.detok.add(self.ids, final=True)
        elif reason != "error":
            self.ids += step.token_ids
            if self.detok.add(self.ids, final=reason == "length"):
                reason = "stop"  # a stop string (the text is cut before it)
        self.finished = reason is not None
        new_text = ""
        # The detokenizer holds back a trailing partial UTF-8 character; never re-send text already streamed.
        if len(self.text) > self.emitted:
            new_text, self.emitted = self.text[self.emitted :], len(self.text)
        out = RequestOutput(
            request_id=step.request_id, new_token_ids=list(step.token_ids), new_text=new_text,
            finished=self.finished, finish_reason=reason, prompt_tokens=step.prompt_tokens,
            completion_tokens=step.completion_tokens, index=step.index, error=step.error,
            prompt_logprobs=step.prompt_logprobs, stop_token_id=step.stop_token_id, cached_tokens=step.cached_tokens,
        )
        if (step.token_ids or step.stop_token_id is not None) and self.params.logprobs:
            # the model's distribution (before sampling filters), as OpenAI; a stop token's too (the legacy
            # completions logprobs list it, as vLLM's do)
            out.logprobs = [step.logprob]
            if self.params.top_logprobs:
                out.top_logprobs = [step.top_logprobs]
        return out


def stopped_by_text(step: StepToken, out: RequestOutput) -> bool:
    """Did the output side end a completion the engine still runs (a stop string)? Then the engine must finish it."""
    return out.finished and step.finish_reason is None


class OutputProcessor:
    """Every completion's stream of one engine, keyed by (request id, index): the synchronous callers' processing."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.streams: dict[tuple[str, int], CompletionStream] = {}

    def add(self, step: StepToken) -> tuple[RequestOutput | None, CompletionStream]:
        """The step's output (None if its completion already ended) and its completion's stream."""
        key = (step.request_id, step.index)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = CompletionStream(self.tokenizer, step.params)
        out = stream.add(step)
        if stream.finished:
            self.streams.pop(key, None)
        return out, stream

    def forget(self, request_id: str) -> None:
        """An aborted request's streams."""
        for key in [k for k in self.streams if k[0] == request_id]:
            del self.streams[key]
