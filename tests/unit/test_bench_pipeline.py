"""`crosstrim bench pipeline` on a tiny workload: its JSON is consistent, and a baseline tree runs in a subprocess."""

import json
from pathlib import Path

import pytest

from pipeline.bench.pipeline import _merged
from pipeline.cli import main as cli_main
from pipeline.model.encoder import VisionEncoder
from pipeline.model.trimmer import Trimmer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # docs/testing.md: its command
def test_bench_pipeline_json_is_consistent_and_runs_a_baseline_tree(tmp_path):
    out = tmp_path / "p.json"
    requests, max_tokens = 5, 4
    # 0.75 MiB of KV holds fewer than 5 untrimmed tiny requests (~0.26 MiB each): admission waits
    assert cli_main(["bench", "pipeline", "--model", "bundled:tiny-mllama", "--requests", str(requests),
                     "--distinct", "2", "--image-size", "128", "--max-tokens", str(max_tokens), "--kv-budget",
                     str(3 * 2**18), "--stage-batch", "2", "--json", str(out), "--baseline-tree", str(ROOT)]) == 0
    r = json.loads(out.read_text())
    assert r["current"]["repeats"] == r["baseline"]["repeats"] == 1
    assert r["current"]["tree"] == r["baseline"]["tree"] == r["baseline_tree"] == str(ROOT)
    for tree in (r["current"], r["baseline"]):
        modes = tree["modes"]
        assert set(modes) == {"trimmed", "untrimmed"} and tree["distinct_images"] == 2
        for m in modes.values():
            assert m["tokens"] == requests * max_tokens and m["requests"] == requests
            # the stages' batched calls whenever this tree has them (both runs are this tree)
            assert m["stages_batched"] == (hasattr(VisionEncoder, "encode_batch") and hasattr(Trimmer, "trim_batch"))
            assert 1 <= m["max_running"] <= requests
            s = m["seconds"]
            assert min(s["encode"], s["trim"], s["prefill_decode"]) > 0
            assert abs(s["total"] - (s["encode"] + s["trim"] + s["prefill_decode"])) < 5e-3
            assert m["tokens_per_s_engine"] >= m["tokens_per_s_end_to_end"] > 0
            assert abs(m["tokens_per_s_end_to_end"] * s["total"] - m["tokens"]) < 0.05 * m["tokens"]
        trimmed, untrimmed = modes["trimmed"], modes["untrimmed"]
        assert trimmed["kept_visual_tokens_per_request"] < untrimmed["kept_visual_tokens_per_request"]
        assert trimmed["kv_bytes_per_request"] < untrimmed["kv_bytes_per_request"]
        assert untrimmed["max_running"] < requests, "the budget was meant to make admission wait"
    ratio = r["ratio_vs_baseline"]["trimmed"]["tokens_per_s_engine"]
    assert ratio == round(r["current"]["modes"]["trimmed"]["tokens_per_s_engine"]
                          / r["baseline"]["modes"]["trimmed"]["tokens_per_s_engine"], 3)


def test_repeats_keep_each_modes_best_run():
    runs = [{"tree": "t", "modes": {"trimmed": {"tokens_per_s_end_to_end": rate, "run": i}}}
            for i, rate in enumerate([3.0, 5.0, 4.0])]
    runs += [{"tree": "t", "modes": {"untrimmed": {"tokens_per_s_end_to_end": rate, "run": i}}}
             for i, rate in enumerate([2.0, 1.0, 0.5])]
    merged = _merged(runs)
    assert merged["repeats"] == 3 and merged["tree"] == "t"
    assert merged["modes"]["trimmed"]["run"] == 1 and merged["modes"]["untrimmed"]["run"] == 0
