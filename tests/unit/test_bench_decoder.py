"""`crosstrim bench decoder` runs with any --hf-batches: without batch 1, and with batches that do not fit the budget."""

import json

import pytest

from pipeline.bench.decoder import hf_batches_that_fit, hf_summary
from pipeline.cli import main as cli_main


def test_hf_batches_that_fit_and_summary():
    assert hf_batches_that_fit("2,4", 6) == [2, 4]
    assert hf_batches_that_fit("1,8", 6) == [1]
    assert hf_batches_that_fit("8", 6) == []
    assert hf_summary({2: 5.0, 4: 8.0}, 16.0)["hf_generate_best_batch"] == 4
    none = hf_summary({}, 16.0)
    assert none["tokens_per_s_hf_generate"] is None and none["trimmed_vs_hf_generate"] is None


@pytest.mark.slow  # docs/testing.md: its command
def test_bench_decoder_runs_with_any_hf_batches(tmp_path):
    """One run (a bench model build each; what none fitting gives is hf_summary's, checked above): batch 64 does not
    fit the budget and is left out, batch 2 runs, batch 1 is not asked for, so exactness is not claimed."""
    out = tmp_path / "d.json"
    assert cli_main(["bench", "decoder", "--requests", "2", "--max-tokens", "2", "--untrimmed-slots", "2",
                     "--hf-batches", "2,64", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["hf_generate_tokens_per_s_by_batch"]) == ["2"]
    assert r["engine_untrimmed_equals_hf_greedy_batch1"] is None  # batch 1 did not run: nothing was checked
    assert r["tokens_per_s_hf_generate"] is not None and r["hf_generate_best_batch"] == 2
    assert r["max_concurrent_untrimmed"] == 2
