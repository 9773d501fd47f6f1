"""LLMEngine: continuous batching over the model runner, KV in pages with preemption; synchronous (add, step, abort).

`step_tokens()` only schedules, runs the model and samples; text (detokenizing, stop strings, deltas) is the output
processor's (output_processor.py), which `step()` runs after it for synchronous callers and which
`pipeline.engine.async_engine.AsyncLLMEngine` runs per stream, off its step thread. Neither knows Ray Serve."""

import logging
import threading
import time
import uuid

import torch

from pipeline.config import EngineConfig
from pipeline.engine.arena import page_layout
from pipeline.engine.cuda_graphs import DecodeGraphs, image_tokens
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.model_runner import ModelRunner
from pipeline.engine.output_processor import OutputProcessor, StepToken, stopped_by_text
from pipeline.engine.sampler import Sampled, Sampler, SampleRow
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.scheduler import PrefillChunk, Scheduler
from pipeline.engine.sequence import Sequence
from pipeline.engine.stats import EngineStats, kv_pressure
from pipeline.engine.step_work import StepWork
from pipeline.engine.structured import GrammarCache, apply_bitmask
from pipeline.engine.token_mask import allocate_bitmask
from pipeline.model.loaded import LoadedModel
from pipeline.types import DecodeRequest, RequestOutput

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None):
        self.loaded = loaded
        self.cfg = cfg or EngineConfig()
        tc = loaded.text_config
        block_size, layout = page_layout(self.cfg.block_size, loaded.device)
        self.kv = KVCache(
            self.cfg.kv_budget_bytes, tc.num_hidden_layers, loaded.cross_layers, tc.num_key_value_heads,
            tc.hidden_size // tc.num_attention_heads, loaded.dtype, loaded.device, block_size, layout,
            placement=loaded.placement, devices=loaded.devices,  # a layer's K/V on its layer's device
            prefix_model=loaded.cache_id if self.cfg.prefix_caching else None,
        )
        self.scheduler = Scheduler(self.cfg, self.kv)
        self.runner = ModelRunner(loaded, self.kv)
        # one device only: a graph captures one device's stream
        if torch.device(loaded.device).type == "cuda" and len(loaded.devices) == 1 and self.cfg.cuda_graphs is not False:
            with torch.inference_mode():
                self.runner.graphs = DecodeGraphs(self.runner, self.cfg.max_running, self.cfg.max_model_len,
                                                  image_tokens(loaded))
        # Structured output's bitmask through xgrammar's kernels (CPU, CUDA): ~6x the torch hook at 128k x 32 rows.
        self.sampler = Sampler(loaded.model.lm_head.out_features, loaded.device, loaded.eos_token_ids,
                               apply_bitmask=apply_bitmask)
        self.tokenizer = loaded.processor.tokenizer
        self.output = OutputProcessor(self.tokenizer)  # step()'s text; the async engine runs its own per stream
        self.eos = set(loaded.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self._grammars: GrammarCache | None = None  # built on the first structured request (xgrammar's vocab scan)
        self._grammars_lock = threading.Lock()
        self.tokens_generated = self.steps = self.last_batch_size = self.decode_steps = self.decode_rows = 0
        self.prompt_rows = 0  # prompt rows prefilled (computed, not taken from the prefix cache)
        self.last_step_ms, self.last_work = 0.0, StepWork()  # the last step's time; its rows and kept-token reads

    def set_limits(self, max_running: int, max_waiting: int) -> None:
        """New admission limits from the next step on (the step thread reads one config object or the other);
        sequences already running beyond a lowered max_running finish, none is preempted for it."""
        self.cfg = self.scheduler.cfg = self.cfg.model_copy(update={"max_running": max_running,
                                                                    "max_waiting": max_waiting})

    # ---- requests in and out

    def make_sequence(self, request: DecodeRequest, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """A sequence for a decode request; checked (InvalidRequest if it could never run), not queued."""
        seq = Sequence.from_request(request_id or uuid.uuid4().hex, request, params)
        self.scheduler.check(seq)
        # A request scoring its prompt (prompt_logprobs) needs every row's hidden state: it neither reads nor fills
        # the prefix cache (as vLLM).
        if self.kv.prefix is not None and params.prompt_logprobs is None:
            seq.page_hashes = self.kv.prefix.hashes(seq.prompt_token_ids, seq.cacheable_rows, params.cache_salt)
        params.check_vocab(self.sampler.vocab_size)
        if params.structured is not None:
            self.grammars.compiled(params.structured)  # a bad spec is refused here; compiled once, cached
        return seq

    @property
    def grammars(self) -> GrammarCache:
        """Structured output's compiled grammars, over the sampler's vocabulary (the lm_head's width)."""
        with self._grammars_lock:  # built once: the first callers may be the step thread and a compile thread
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.sampler.vocab_size, sorted(self.eos),
                                              self.cfg.grammar_cache_size)
        return self._grammars

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; Overloaded when the queue is full (callers ask has_room() first)."""
        if seq.request_id in self.seqs:
            raise ValueError(f"duplicate request id {seq.request_id}")
        self.scheduler.add(seq)
        self.seqs[seq.request_id] = seq
        return seq

    def add_request(self, request: DecodeRequest, params: SamplingParams, request_id: str | None = None) -> Sequence:
        return self.add(self.make_sequence(request, params, request_id))

    def abort(self, request_id: str) -> None:
        self.output.forget(request_id)
        seq = self.seqs.pop(request_id, None)
        for s in [seq] + seq.siblings if seq is not None else []:
            if not s.finished:
                self.scheduler.finish(s, "abort")

    def abort_all(self) -> None:
        """Abort every request in the engine, freeing all its KV (what a caller does after a failed step)."""
        for request_id in list(self.seqs):
            self.abort(request_id)

    def finish_completion(self, request_id: str, index: int, reason: str = "stop") -> None:
        """End one completion the output side ended (a stop string), freeing its KV; gone or done already: nothing."""
        seq = self.seqs.get(request_id)
        done = next((s for s in ([seq] + seq.siblings if seq else []) if s.index == index), None)
        if done is not None and not done.finished:
            self.scheduler.finish(done, reason)
            self._forget_if_done(done)

    def fail_all(self, exc: BaseException) -> list[StepToken]:
        """End every request in the engine with an error output (a step failed outside any one sequence)."""
        return [self.fail(seq, exc) for seq in list(self.seqs.values())]

    # ---- admission and KV, for callers (nothing outside the engine reads its scheduler or KV cache)

    def has_room(self, pending: int = 0) -> bool:
        """May another request queue now? `pending`: accepted by a caller, not yet added (the async inbox)."""
        return self.scheduler.has_room(pending)

    def queue_room(self, pending: int = 0) -> int:
        """How many more requests has_room would take now (what the decoder reports to the ingress's admission)."""
        return self.scheduler.queue_room(pending)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.scheduler.swapped)

    @property
    def num_requests(self) -> int:
        """Requests in the engine (each of n completions counted once)."""
        return len(self.seqs)

    def kv_bytes_for(self, request: DecodeRequest, params: SamplingParams) -> int:
        """KV bytes the request's n completions may hold, as admission counts them: each completion's prompt,
        max_tokens and kept visual tokens (siblings share the prompt's pages, so this is an upper bound)."""
        return params.n * self.kv.bytes_needed(request.prompt_len + params.max_tokens, request.num_kept)

    def kv_bytes_per_token(self) -> float:
        """KV bytes a text token reserves, page rounding averaged out (the ingress's per-key accounting)."""
        return self.kv.bytes_needed(4096, 0) / 4096

    @property
    def kv_budget_bytes(self) -> int:
        return self.kv.capacity_bytes

    def pressure(self) -> float:
        """The KV pressure elastic trimming follows (stats.kv_pressure; AsyncLLMEngine publishes it with the stats)."""
        return kv_pressure(self.scheduler, self.kv)

    def count_admissible(self) -> int:
        """Dry run: how many waiting requests the next step would admit."""
        return self.scheduler.count_admissible()

    # ---- stepping

    def step(self) -> list[RequestOutput]:
        """step_tokens(), then their outputs with text; a completion a stop string ends is finished at once (its
        Sequence's text and finish_reason are kept for offline callers)."""
        outputs = []
        for seq, token in self._step():
            out, stream = self.output.add(token)
            if out is None:
                continue
            seq.text = stream.text
            if stopped_by_text(token, out):
                self.finish_completion(seq.request_id, seq.index)
            if out.finished:
                seq.finish_reason = out.finish_reason  # a stop string at the length limit says "stop", as before
                out.kept_tokens_end, out.shed_at = (seq.cross_tokens, seq.shed_at) if seq.image else (None, None)  # elastic
            outputs.append(out)
        return outputs

    def step_tokens(self) -> list[StepToken]:
        """One step without output processing: what each completion sampled, in host values."""
        return [token for _, token in self._step()]

    def _step(self) -> list[tuple[Sequence, StepToken]]:
        """Prefill chunks of admitted prompts (within the step's token budget) and decode every other running
        sequence by one token; every row of the step (each completion whose prompt ended and each decoded sequence)
        is sampled in one batch. A failure while processing one sequence fails that sequence alone (a token with
        finish_reason "error")."""
        t0 = time.perf_counter()
        outputs, rows, logits = [], [], []  # rows to sample, and their logits in parts (rows_i, V)
        self.last_work = StepWork.of(plan := self.scheduler.schedule())  # what a simulated clock charges
        if plan.prefill:
            self.prompt_rows += sum(c.end - c.start for c in plan.prefill)
            outputs += self._prefill(plan.prefill, rows, logits)
        batch = plan.decode
        if batch:
            self.decode_steps += 1
            self.decode_rows += len(batch)
            outputs += self._decode(batch, rows, logits)
        if rows:
            outputs += self._sample(rows, torch.cat(logits))
        self.steps += 1
        self.last_batch_size = len(batch)
        self.last_step_ms = (time.perf_counter() - t0) * 1e3
        return outputs

    def _prefill(self, chunks: list[PrefillChunk], rows: list[Sequence],
                 logits: list[torch.Tensor]) -> list[tuple[Sequence, StepToken]]:
        """The chunks in one forward; each prompt it ends joins the step's rows with its n completions (the prompt's
        logits for each). If the forward fails, each chunk runs alone so the fault stays with its sequence."""
        try:
            parts, failed = [self.runner.prefill(chunks)], []
        except Exception:
            log.warning("batched prefill of %d chunks failed; retrying each alone", len(chunks), exc_info=True)
            parts, failed = [], []
            for c in chunks:
                try:
                    parts.append(self.runner.prefill([c]))
                except Exception as exc:  # noqa: BLE001 - the offender fails alone
                    failed.append((c.seq, self.fail(c.seq, exc)))  # siblings fork after the last chunk
        for done, prompt_logits in parts:
            for seq, row in zip(done, prompt_logits):
                try:
                    self._start_completions(seq)
                except Exception as exc:  # noqa: BLE001 - any failure of one request fails that request alone
                    failed += [(s, self.fail(s, exc)) for s in [seq] + seq.siblings]
                    continue
                if seq.params.max_tokens == 0:  # the prompt scored only: every completion ends unsampled
                    failed += [(s, self._end_unsampled(s)) for s in [seq] + seq.siblings]
                    continue
                rows += [seq] + seq.siblings  # the n completions' first tokens from the one prompt's logits
                logits.append(row[None].expand(1 + len(seq.siblings), -1))
        return failed

    def _start_completions(self, seq: Sequence) -> None:
        """After the prompt's prefill: its n - 1 sibling completions forked, each one's detokenizer and mask."""
        for i in range(1, seq.params.n):  # n > 1: siblings share the prompt's and image's pages
            child = Sequence(seq.request_id, seq.prompt_token_ids, seq.params, seq.image)
            child.index, child.arrival, child.prefilled = i, seq.arrival, seq.prefilled
            child.cached_tokens = seq.cached_tokens
            self.scheduler.fork(seq, child)
            seq.siblings.append(child)
        for s in [seq] + seq.siblings:
            if s.params.structured is not None:  # each completion walks its own copy of the grammar
                s.logit_mask = self.grammars.matcher(s.params.structured)

    def _end_unsampled(self, seq: Sequence) -> StepToken:
        """A completion of max_tokens 0 (the prompt only scored) ends after the prefill, with no token."""
        self.scheduler.finish(seq, "length")
        self._forget_if_done(seq)
        return StepToken(seq.request_id, seq.index, seq.params, seq.prompt_len, 0, [], finish_reason="length",
                         prompt_logprobs=seq.prompt_logprobs if seq.index == 0 else None)

    def prefill_logits(self, request: DecodeRequest) -> torch.Tensor:
        """The next-token logits (V,) after a request's prompt, from its prefill alone in one chunk, on an idle
        engine (the exactness tests' first step); nothing stays in the engine after."""
        assert not self.has_work(), "prefill_logits runs on an idle engine"
        seq = self.add_request(request, SamplingParams(max_tokens=1))
        try:
            assert self.scheduler.admit_next() is seq, "the request does not fit the KV budget"
            _, prompt_logits = self.runner.prefill([PrefillChunk(seq, seq.prefilled, seq.prompt_len)])
            return prompt_logits[0]
        finally:
            self.abort(seq.request_id)

    def _decode(self, batch: list[Sequence], rows: list[Sequence],
                logits: list[torch.Tensor]) -> list[tuple[Sequence, StepToken]]:
        """One batched forward; its rows join the step's `rows` / `logits`. If the forward itself fails, run each
        sequence alone so the survivors go on without the offender (a position's K/V is rewritten, not added)."""
        try:
            logits.append(self.runner.decode(batch))
            rows += batch
            return []
        except Exception:
            log.warning("batched decode of %d sequences failed; retrying each alone", len(batch), exc_info=True)
        failed = []
        for s in batch:
            try:
                logits.append(self.runner.decode([s]))
                rows.append(s)
            except Exception as exc:  # noqa: BLE001 - the offender fails alone
                failed.append((s, self.fail(s, exc)))
        return failed

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, StepToken]]:
        """Sample every row at once (one host read), then append each under its own guard. If the batch cannot be
        sampled (a row's mask hook raised, say), sample each row alone so the fault stays with its row."""
        try:
            sampled = self._sample_rows(rows, logits)
        except Exception:
            log.warning("batched sampling of %d rows failed; sampling each alone", len(rows), exc_info=True)
            return [(s, self._guarded(s, lambda s, i=i: self._append(s, self._sample_rows([s], logits[i : i + 1])[0])))
                    for i, s in enumerate(rows)]
        return [(s, self._guarded(s, lambda s, r=r: self._append(s, r))) for s, r in zip(rows, sampled)]

    def _sample_rows(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sampled | None]:
        """(len(rows), V) logits -> each row's token; a row with a logit mask (structured output) fills its bitmask
        row first. A completion's seed is the request's + its index (n > 1 completions differ, each reproducible)."""
        masked = [(i, s.logit_mask) for i, s in enumerate(rows) if s.logit_mask is not None]
        bitmask = None
        if masked:
            bitmask = allocate_bitmask(len(rows), self.sampler.vocab_size)
            for i, mask in masked:
                mask.fill_bitmask(bitmask, i)
        meta = self.sampler.prepare([
            SampleRow(s.params, None if s.params.seed is None else s.params.seed + s.index, s.prompt_token_ids,
                      s.output_ids) for s in rows], bitmask)
        return self.sampler.sample(logits, meta)

    def _guarded(self, seq: Sequence, work) -> StepToken:
        try:
            return work(seq)
        except Exception as exc:  # noqa: BLE001 - one sequence's failure is that sequence's alone
            return self.fail(seq, exc)

    def fail(self, seq: Sequence, exc: BaseException) -> StepToken:
        """End one sequence with an error, freeing its KV; logged with its id and reason, never its prompt."""
        log.error("request %s failed in the engine: %s: %s", seq.request_id, type(exc).__name__, exc)
        if not seq.finished:
            self.scheduler.finish(seq, "error")
        self._forget_if_done(seq)
        return StepToken(seq.request_id, seq.index, seq.params, seq.prompt_len, len(seq.output_ids), [],
                         finish_reason="error", error=type(exc).__name__, cached_tokens=seq.cached_tokens)

    def _forget_if_done(self, seq: Sequence) -> None:
        """Drop the request once every one of its n completions has finished."""
        parent = self.seqs.get(seq.request_id)
        if parent is not None and all(s.finished for s in [parent] + parent.siblings):
            del self.seqs[seq.request_id]

    def _append(self, seq: Sequence, sampled: Sampled | None) -> StepToken:
        """A sampled token (host values from the step's one read) into the sequence: its grammar advanced (it
        constrains the next token), a stop token or max_tokens ended; no text (the output processor's).
        Nothing to sample (`sampled` None: the grammar allows only a stop token, which min_tokens or ignore_eos
        bans; or a grammar left no token at all) ends the completion there, finish_reason "stop": the constraint
        wins over those fields, and the engine never fails a request for it (docs/validation.md)."""
        if sampled is None:
            self.scheduler.finish(seq, "stop")
            self._forget_if_done(seq)
            return StepToken(seq.request_id, seq.index, seq.params, seq.prompt_len, len(seq.output_ids), [],
                             finish_reason="stop")
        token = sampled.token
        if seq.logit_mask is not None:
            seq.logit_mask.accept(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_ids.append(token)
        seq.logprobs.append(sampled.logprob)
        self.tokens_generated += 1
        new_ids, reason = [token], None
        # EOS under a grammar is the grammar's end (it allows EOS only once complete): it ends the completion even
        # with ignore_eos, which applies to unconstrained text.
        ends = token in self.eos and (not seq.params.ignore_eos or seq.logit_mask is not None)
        if token in seq.params.stop_token_ids or ends:
            reason, new_ids = "stop", []  # the stop token itself is not part of the output
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._forget_if_done(seq)
        first = seq.index == 0 and len(seq.output_ids) == 1  # the prompt's log-probabilities go with it, once
        return StepToken(seq.request_id, seq.index, seq.params, seq.prompt_len, len(seq.output_ids), new_ids,
                         finish_reason=reason, logprob=sampled.logprob, top_logprobs=sampled.top_logprobs,
                         prompt_logprobs=seq.prompt_logprobs if first else None,
                         stop_token_id=token if reason == "stop" else None, cached_tokens=seq.cached_tokens)

    def prefix_digest(self) -> dict | None:
        """The prefix cache's pages in short form, for routing by prefix (None: no prefix cache)."""
        return None if self.kv.prefix is None else self.kv.prefix.digest()

    def reset_prefix_cache(self) -> int:
        """vLLM's reset_prefix_cache (KVCache.reset_prefix): how many pages were cached."""
        return self.kv.reset_prefix()

    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self.kv, prompt_rows_computed=self.prompt_rows,
                              tokens_generated=self.tokens_generated, steps=self.steps, last_step_ms=self.last_step_ms,
                              last_batch_size=self.last_batch_size, decode_steps=self.decode_steps,
                              decode_rows=self.decode_rows)

    def generate(self, requests: list[DecodeRequest], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Offline: run every request to completion, continuously batched; sequences in input order."""
        params = params if isinstance(params, list) else [params] * len(requests)
        seqs = [self.add_request(r, p) for r, p in zip(requests, params)]
        while self.has_work():
            self.step()
        return seqs
