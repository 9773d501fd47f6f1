"""The batched sampler: a step's per-row sampling metadata built once as tensors, one vectorised pass over the
(B, V) logits for every row's parameters, and one device-to-host read of tokens, logprobs and top logprobs."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from pipeline.engine.sampling import SamplingParams
from pipeline.engine.token_mask import apply_token_bitmask

MASK64 = 2**64 - 1
UNIFORM_BITS = 24  # float32's mantissa: every draw is exact in float32, in [0, 1 - 2^-24]


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers whose outputs look independent."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform draw of a seeded row at output position `step`: a counter-based function of (seed, step) only,
    so a seeded request samples the same whatever shares its batch, after preemption, and on any device."""
    return (_mix64(_mix64(seed & MASK64) ^ step) >> (64 - UNIFORM_BITS)) / 2**UNIFORM_BITS


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one row."""

    params: SamplingParams
    seed: int | None  # the row's stream (a request's seed + its completion index); None: the sampler's generator
    prompt_ids: Sequence[int]  # read only for repetition_penalty
    output_ids: Sequence[int]  # tokens generated so far: the penalties' counts, min_tokens, the seeded step


@dataclass(frozen=True)
class Sampled:
    """One row's result on the host."""

    token: int
    logprob: float  # log p(token) under the model's raw distribution; 0.0 unless the row asked for logprobs
    top_logprobs: list[tuple[int, float]]  # the row's top_logprobs most likely (token, log p), raw distribution


@dataclass(frozen=True)
class Penalties:
    rows: torch.Tensor  # (P,) the penalised rows
    presence: torch.Tensor  # (P, 1)
    frequency: torch.Tensor  # (P, 1)
    repetition: torch.Tensor  # (P, 1)
    counts: torch.Tensor  # (P, V) float32: each token's count in the row's output
    seen: torch.Tensor  # (P, V) bool: in the prompt or the output (repetition_penalty's set)


@dataclass(frozen=True)
class SamplingBatch:
    """A step's sampling metadata, on the logits' device. Optional parts are None when no row uses them, so the
    pass skips their work; every branch is on these host values, never on a tensor's contents."""

    params: list[SamplingParams]
    temperature: torch.Tensor  # (B, 1) float32, 1 on greedy rows
    greedy: torch.Tensor  # (B,) bool
    uniform: torch.Tensor  # (B,) float32: seeded rows' draws (seeded_uniform), 0 elsewhere
    seeded: torch.Tensor  # (B,) bool
    all_greedy: bool
    top_k: torch.Tensor | None  # (B, 1) int64: k - 1, the k-th largest's index in a descending top-k; -1 where off
    max_top_k: int
    top_p_rows: torch.Tensor | None  # (R,) rows with top_p < 1
    top_p: torch.Tensor | None  # (R, 1)
    top_p_candidates: int | None  # every top-p row has a top_k of at most this: no full sort (None: sort)
    min_p: torch.Tensor | None  # (B, 1), 0 where off
    penalties: Penalties | None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, tokens, values), flat
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, tokens) below min_tokens: EOS and stop ids
    bitmask: torch.Tensor | None  # (B, ceil(V / 32)) int32, xgrammar's layout (pipeline.engine.token_mask)
    num_top_logprobs: int  # the most any row asked for
    want_logprobs: bool


def _flat(lists: list[list[int]], device, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token) of every in-vocabulary token of each list, as two flat int64 tensors."""
    rows = [i for i, ids in enumerate(lists) for t in ids if t < vocab_size]
    tokens = [t for t in chain.from_iterable(lists) if t < vocab_size]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(tokens, dtype=torch.long, device=device)


class Sampler:
    """Samples a batch in one pass over its logits (B, V), each row under its own SamplingParams.

    Order of operations (vLLM V1's `Sampler`, except where noted):
      0. logprobs: log_softmax of the raw logits, before anything below (OpenAI's and vLLM's default
         `raw_logprobs`); the sampled token's and the top_logprobs most likely tokens' values.
      1. the row's token bitmask (structured output; -inf where disallowed). vLLM V1 applies it before the
         sampler, so its logprobs see it; ours are the model's raw distribution.
      2. min_tokens: EOS (unless ignore_eos) and stop_token_ids -> -inf while fewer than min_tokens were generated.
      3. logit_bias: added to the logit (OpenAI; vLLM adds it here too, before the penalties).
      4. penalties (vLLM's `apply_penalties`): repetition_penalty as HF / CTRL over the prompt and output tokens
         (a seen token's positive logit divided by it, a negative one multiplied); then OpenAI's
         `logit -= frequency_penalty * count + presence_penalty * (count > 0)` over the output tokens.
      5. greedy rows (temperature 0): argmax here, exactly (first index of the maximum, as HF's generate).
      6. temperature: logits / T.
      7. top_k: keep logits >= the k-th largest (ties kept).
      8. top_p: keep the smallest most-likely prefix whose probability reaches top_p (the likeliest always).
      9. min_p: drop tokens whose probability < min_p * the likeliest's. vLLM V1 applies min_p before top-k/top-p;
         this is HF's and vLLM V0's order (which differs only when top_p and min_p are both set).
     10. draw: inverse CDF with one uniform a row (the cumulative sum of the kept probabilities, searched for
         u * total): exactly a draw from the renormalised distribution. A seeded row's u is seeded_uniform(seed,
         step), a counter-based function of the seed and its output position; other rows' come from one
         generator of the sampler's.
    """

    def __init__(self, vocab_size: int, device, eos_token_ids: Sequence[int] = (),
                 apply_bitmask: Callable[[torch.Tensor, torch.Tensor], None] = apply_token_bitmask,
                 generator: torch.Generator | None = None):
        if vocab_size >= 2**24:
            raise ValueError("token ids travel to the host as float64 beside the logprobs; 2^24 is plenty")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos = sorted(eos_token_ids)
        self.apply_bitmask = apply_bitmask  # xgrammar.apply_token_bitmask_inplace has this signature
        self.generator = generator or torch.Generator(self.device)
        if generator is None:
            self.generator.seed()

    # ---- metadata, built once a step on the host and moved in a handful of copies

    def prepare(self, rows: Sequence[SampleRow], bitmask: torch.Tensor | None = None) -> SamplingBatch:
        dev, V = self.device, self.vocab_size
        params = [r.params for r in rows]
        scalars = torch.tensor([[p.temperature or 1.0, p.min_p, 1.0 if p.greedy else 0.0,
                                 seeded_uniform(r.seed, len(r.output_ids)) if r.seed is not None else 0.0,
                                 1.0 if r.seed is not None else 0.0] for r, p in zip(rows, params)],
                               dtype=torch.float32).to(dev)
        k = [p.top_k if 0 < p.top_k < V and not p.greedy else 0 for p in params]
        max_top_k = max(k, default=0)
        top_p = [(i, p.top_p) for i, p in enumerate(params) if p.top_p < 1.0 and not p.greedy]
        return SamplingBatch(
            params=params, temperature=scalars[:, 0:1], greedy=scalars[:, 2] > 0, uniform=scalars[:, 3],
            seeded=scalars[:, 4] > 0, all_greedy=all(p.greedy for p in params),
            top_k=torch.tensor([[x - 1] for x in k], device=dev) if max_top_k else None,
            max_top_k=max_top_k,
            top_p_rows=torch.tensor([i for i, _ in top_p], device=dev) if top_p else None,
            top_p=torch.tensor([[q] for _, q in top_p], dtype=torch.float32, device=dev) if top_p else None,
            top_p_candidates=max(k[i] for i, _ in top_p) if top_p and all(k[i] for i, _ in top_p) else None,
            min_p=scalars[:, 1:2] if any(p.min_p > 0 and not p.greedy for p in params) else None,
            penalties=self._penalties(rows),
            bias=self._bias(params),
            banned=self._banned(rows),
            bitmask=None if bitmask is None else bitmask.to(dev, non_blocking=True),
            num_top_logprobs=max((p.top_logprobs for p in params if p.logprobs), default=0),
            want_logprobs=any(p.logprobs for p in params),
        )

    def _penalties(self, rows: Sequence[SampleRow]) -> Penalties | None:
        idx = [i for i, r in enumerate(rows) if r.params.penalised]
        if not idx:
            return None
        dev, V, P = self.device, self.vocab_size, len(idx)
        ps = [rows[i].params for i in idx]
        factors = torch.tensor([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in ps],
                               dtype=torch.float32, device=dev)
        out_rows, out_tokens = _flat([list(rows[i].output_ids) for i in idx], dev, V)
        counts = torch.zeros(P * V, dtype=torch.float32, device=dev)
        counts.index_add_(0, out_rows * V + out_tokens, torch.ones(out_tokens.shape, device=dev))
        counts = counts.view(P, V)
        prompt_rows, prompt_tokens = _flat([list(rows[i].prompt_ids) if p.repetition_penalty != 1.0 else []
                                            for i, p in zip(idx, ps)], dev, V)
        seen = counts > 0
        seen[prompt_rows, prompt_tokens] = True
        return Penalties(torch.tensor(idx, device=dev), factors[:, 0:1], factors[:, 1:2], factors[:, 2:3],
                         counts, seen)

    def _bias(self, params: list[SamplingParams]):
        entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if t < self.vocab_size]
        if not entries:
            return None
        rows, tokens, values = zip(*entries)
        return (torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device),
                torch.tensor(values, dtype=torch.float32, device=self.device))

    def _banned(self, rows: Sequence[SampleRow]):
        stops = [(p.stop_token_ids + ([] if p.ignore_eos else self.eos)) if len(r.output_ids) < p.min_tokens else []
                 for r, p in ((r, r.params) for r in rows)]
        if not any(stops):
            return None
        return _flat(stops, self.device, self.vocab_size)

    # ---- the pass

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> list[Sampled | None]:
        """logits (B, V) -> each row's Sampled, or None for a row whose every token was masked out (nothing can
        be sampled: the caller fails that row alone). One device-to-host read."""
        return self._to_host(self.sample_packed(logits, batch), batch)

    def sample_packed(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The device part: (B, 3 + 2K) float64 [token, its logprob, any token allowed, K top ids, K top logprobs]."""
        B = logits.shape[0]
        x = self.process(logits, batch)
        tokens = x.argmax(-1)  # (B,) the greedy rows' tokens (the first maximum, as HF)
        if batch.bitmask is not None or batch.banned is not None:  # only masks make a row all -inf
            allowed = x.gather(1, tokens[:, None])[:, 0] > float("-inf")
        else:
            allowed = torch.ones_like(tokens, dtype=torch.bool)
        if not batch.all_greedy:
            tokens = torch.where(batch.greedy, tokens, self.draw(self.distribution(x, batch), batch))
        cols = [tokens.double()[:, None], torch.zeros(B, 1, dtype=torch.float64, device=x.device),
                allowed.double()[:, None]]
        if batch.want_logprobs:
            raw = torch.log_softmax(logits.float(), -1)  # the model's distribution
            cols[1] = raw.gather(1, tokens[:, None]).double()
            if batch.num_top_logprobs:
                top = raw.topk(batch.num_top_logprobs, -1)
                cols += [top.indices.double(), top.values.double()]
        return torch.cat(cols, 1)

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Steps 1-4: (B, V) raw logits -> (B, V) float32 logits the greedy rows take the argmax of (a copy when
        any step applies; the caller's logits are never written)."""
        x = logits.float()
        if any(t is not None for t in (batch.bitmask, batch.banned, batch.bias, batch.penalties)):
            x = x.clone()
        if batch.bitmask is not None:
            self.apply_bitmask(x, batch.bitmask)
        if batch.banned is not None:
            x[batch.banned] = float("-inf")
        if batch.bias is not None:
            rows, tokens, values = batch.bias
            x.index_put_((rows, tokens), values, accumulate=True)
        if batch.penalties is not None:
            _penalise(x, batch.penalties)
        return x

    def distribution(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Steps 6-9 on every row: processed logits (B, V) -> unnormalised probabilities (B, V) to draw from
        (they sum to 1 before min_p's cut). Rows with every token masked give NaN (and are reported not allowed)."""
        x = x / batch.temperature
        if batch.top_k is not None:
            kth = x.topk(batch.max_top_k, -1).values.gather(1, batch.top_k.clamp(min=0))  # (B, 1)
            x = x.masked_fill((x < kth) & (batch.top_k >= 0), float("-inf"))
        if batch.top_p is not None:
            rows = batch.top_p_rows
            x[rows] = _top_p(x[rows], batch.top_p, batch.top_p_candidates)
        probs = x.softmax(-1)
        if batch.min_p is not None:
            probs = probs.masked_fill(probs < batch.min_p * probs.amax(-1, keepdim=True), 0.0)
        return probs

    def draw(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Step 10: (B, V) probabilities -> (B,) tokens by inverse CDF, one uniform a row."""
        u = torch.rand(probs.shape[0], generator=self.generator, device=probs.device)
        u = torch.where(batch.seeded, batch.uniform, u)
        cdf = probs.cumsum(-1)  # non-decreasing in floating point too: a zero-probability token is never hit
        total = cdf[:, -1:]
        target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.shape[1] - 1)

    @staticmethod
    def _to_host(packed: torch.Tensor, batch: SamplingBatch) -> list[Sampled | None]:
        K = batch.num_top_logprobs
        out = []
        for row, p in zip(read_host(packed), batch.params):
            if row[2] == 0.0:
                out.append(None)
                continue
            n = p.top_logprobs if p.logprobs else 0
            tops = list(zip((int(t) for t in row[3 : 3 + n]), row[3 + K : 3 + K + n]))
            out.append(Sampled(int(row[0]), row[1] if p.logprobs else 0.0, tops))
        return out


def read_host(packed: torch.Tensor) -> list[list[float]]:
    """The step's one device-to-host read."""
    return packed.cpu().tolist()


def _top_p(x: torch.Tensor, top_p: torch.Tensor, candidates: int | None) -> torch.Tensor:
    """x (R, V) -> x with every token outside its row's top-p set at -inf: the smallest most-likely prefix (in
    descending order) whose probability reaches top_p; the likeliest always stays. With `candidates` (every row's
    top_k already applied, k <= candidates) only the top `candidates` are ordered, not the whole vocabulary: any
    other token (a tie of the k-th kept by top_k) comes after them all, so it stays only if they hold < top_p."""
    if candidates is None:
        probs, order = x.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before the token already reaches top_p
        drop[:, 0] = False
        return x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs, order = x.softmax(-1).topk(candidates, -1)  # (R, C) descending
    drop = probs.cumsum(-1) - probs >= top_p
    drop[:, 0] = False
    rest = (probs.sum(-1, keepdim=True) >= top_p).expand_as(x)  # tokens outside the candidates
    return x.masked_fill(rest.clone().scatter_(1, order, drop), float("-inf"))


def _penalise(x: torch.Tensor, pen: Penalties) -> None:
    """In place on the penalised rows of x (B, V): vLLM's apply_penalties (repetition, frequency, presence)."""
    sub = x[pen.rows]  # (P, V)
    rep = pen.repetition
    sub = torch.where(pen.seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - pen.frequency * pen.counts - pen.presence * (pen.counts > 0)
    x[pen.rows] = sub
