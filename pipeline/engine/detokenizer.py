"""Incremental detokenization (vLLM's prefix/read offsets): each step decodes only the last few tokens, so the
cost per token stays constant however long the output grows; a trailing partial UTF-8 character is held back."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens  # stop strings are matched only once more tokens than this were generated (vLLM)
        self.text = ""  # the output so far, cut at a stop string
        self.prefix_offset = self.read_offset = 0  # tokens [prefix, read) are decoded context for the next delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int], final: bool = False) -> bool:
        """`ids` is every output token so far; appends the newly complete text to `self.text` (the held-back tail
        too when `final`); True when a stop string appeared (the text is then cut before it)."""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        new = self._decode(ids[self.prefix_offset :])
        if len(new) <= len(prefix) or (new.endswith("\ufffd") and not final):
            return False  # no complete character yet
        delta = new[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += delta
        if len(ids) <= self.min_tokens:
            return False
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False
