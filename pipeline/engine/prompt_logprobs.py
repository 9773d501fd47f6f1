"""The prompt's log-probabilities (vLLM's prompt_logprobs; the completions API's echo with logprobs), computed only
for the sequences that ask: the prefill's final hidden rows of a chunk -> lm_head -> log_softmax (fp32) -> each
row's score of the prompt's next token, its rank, and the k likeliest tokens. A prompt token the lm_head has no
column for (mllama's image token, past the text vocabulary) has no log-probability: its entry is None, like the
first token's."""

from collections.abc import Callable

import torch

from pipeline.types import PromptLogprob

ROWS_PER_PASS = 128  # rows whose (rows, V) fp32 logits exist at once: 64 MB at Llama's 128k vocabulary


def score_rows(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
               k: int) -> list[PromptLogprob | None]:
    """h (rows, hidden) final hidden states before the norm, `head` their logits (rows, V); targets (rows,) the
    token each row is followed by in the prompt. One host read per pass."""
    out = []
    for a in range(0, len(targets), ROWS_PER_PASS):
        logp = torch.log_softmax(head(h[a : a + ROWS_PER_PASS]).float(), dim=-1)  # (r, V)
        t = targets[a : a + ROWS_PER_PASS].to(logp.device)
        lp = logp.gather(1, t.clamp(max=logp.shape[1] - 1)[:, None])  # (r, 1); out of the vocabulary: None below
        rank = (logp > lp).sum(dim=1) + 1  # ties share the better rank, as vLLM's
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        rows = zip(t.tolist(), lp[:, 0].tolist(), rank.tolist(), top_i.tolist(), top_v.tolist())
        out += [PromptLogprob(tok, v, r, list(zip(ids, vals))) if tok < logp.shape[1] else None
                for tok, v, r, ids, vals in rows]
    return out
