"""Structured output on xgrammar: what a request constrains its output to, grammars compiled once and cached, and
the per-sequence matcher that fills its row of the batch's token bitmask and advances with each sampled token."""

import json
import threading
from collections import OrderedDict
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from pipeline.errors import InvalidRequest

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


class StructuredOutput(BaseModel):
    """One constraint on a completion's text (vLLM's structured_outputs, OpenAI's response_format). `spec` is the
    schema as canonical JSON, the regex, the choices as a JSON list or the EBNF grammar: with `kind` it is the
    cache key, so equal schemas written differently share one compiled grammar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequest(f"the JSON schema is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("a JSON schema is an object")
        return cls(kind="json_schema", spec=json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: list[str]) -> "StructuredOutput":
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest("a choice list holds one or more non-empty strings")
        return cls(kind="choice", spec=json.dumps(list(choices), ensure_ascii=False))

    def grammar(self):
        """The xgrammar Grammar (no tokenizer needed): building it checks the spec; InvalidRequest if bad."""
        import xgrammar as xgr

        try:
            if self.kind == "json_schema":
                # Fixed separators: a model (or random weights) cannot pad the JSON with whitespace forever.
                return _without_surrogates(xgr.Grammar.from_json_schema(self.spec, any_whitespace=False,
                                                                        strict_mode=True))
            if self.kind == "json_object":
                return _without_surrogates(xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False))
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.spec)
            if self.kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(self.spec))
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            return xgr.Grammar.from_ebnf(self.spec)
        except Exception as exc:  # noqa: BLE001 - xgrammar reports a bad spec as RuntimeError("[time] file: why")
            reason = str(exc).strip().splitlines()[0].split(": ", 1)[-1]
            raise InvalidRequest(f"invalid {self.kind.replace('_', ' ')}: {reason}") from None


# xgrammar 0.2.9's JSON string characters, as its EBNF prints them: one class for a bounded string's characters
# (maxLength/minLength), one for an unbounded string's.
JSON_STRING_CLASSES = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')


def _without_surrogates(grammar):
    """The grammar with surrogate code points (U+D800-DFFF) out of its JSON string characters. xgrammar admits them
    as 3-byte UTF-8 (ED A0-BF xx), which is not valid UTF-8: the client would read three U+FFFD where the grammar
    counted one character, breaking maxLength (seen at temperature 1). Rebuilt from the EBNF text, narrowed."""
    import xgrammar as xgr

    text = str(grammar)
    for cls in JSON_STRING_CLASSES:
        text = text.replace(cls, cls[:-1] + r"\ud800-\udfff]")
    return xgr.Grammar.from_ebnf(text)


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of the vocabulary, `vocab_size` wide (the lm_head's width: Llama-3.2-Vision's tokenizer has
    one more token, <|image|>, that the model never emits). Special tokens become empty strings, which xgrammar
    never allows inside a grammar: the detokenizer drops them, so text the grammar saw would not be the text sent."""
    import xgrammar as xgr

    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    vocab = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size:
            vocab[idx] = token
    for idx, added in tokenizer.added_tokens_decoder.items():
        if added.special and idx < vocab_size:
            vocab[idx] = ""
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids,
                             add_prefix_space=detected.add_prefix_space)


class GrammarCache:
    """Compiled grammars for one vocabulary, least recently used out past `max_entries` (xgrammar's own cache is
    off, so this is the one bound). Thread-safe: the ingress's loop checks, the engine's thread compiles."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_entries: int = 64):
        import xgrammar as xgr

        self.vocab_size, self.max_entries = vocab_size, max_entries
        info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.json_tokens = _without_control_bytes(info.decoded_vocab, vocab_size)
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compiled(self, spec: StructuredOutput):
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                self.hits += 1
                return self._compiled[spec]
        grammar = spec.grammar()  # InvalidRequest for a bad spec, before any compile work
        compiled = self.compiler.compile_grammar(grammar)
        with self._lock:
            self.misses += 1
            self._compiled[spec] = compiled
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> "GrammarMatcher":
        json_kind = spec.kind in ("json_schema", "json_object")
        return GrammarMatcher(self.compiled(spec), self.json_tokens if json_kind else None)

    def __len__(self) -> int:
        return len(self._compiled)


def _without_control_bytes(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """(ceil(V / 32),) int32 packed mask of the tokens without a byte below 0x20. xgrammar's JSON strings admit raw
    control characters, which JSON forbids (they must be escaped); with fixed separators valid JSON needs none."""
    allowed = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)
    for i, raw in enumerate(decoded_vocab[:vocab_size]):
        allowed[i] = all(b >= 0x20 for b in raw)
    bits = (allowed.view(-1, 32) << torch.arange(32)).sum(-1)  # bit j of word w = token 32 w + j, as xgrammar packs
    return bits.to(torch.int64).where(bits < 2**31, bits - 2**32).to(torch.int32)


class GrammarMatcher:
    """One sequence's position in its grammar (the sampler's TokenMask, pipeline/engine/token_mask.py): fills its
    row of the step's bitmask, advances on each sampled token."""

    def __init__(self, compiled, also_allowed: torch.Tensor | None = None):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.also_allowed = also_allowed  # a static packed mask ANDed in (JSON: no raw control characters)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_terminated():  # past the grammar's stop token: nothing more (the engine ends the row)
            bitmask[row] = 0
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.also_allowed is not None:
            bitmask[row] &= self.also_allowed

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):  # only when a caller sampled past the mask: a bug, fail the row
            raise RuntimeError(f"token {token} is outside the grammar")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The sampler's bitmask hook on xgrammar's kernels: disallowed tokens' logits (B, V) to -inf, in place, on
    the logits' device (its CPU kernel, or CUDA's)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1])
