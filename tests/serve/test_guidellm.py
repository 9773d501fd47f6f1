"""A real benchmark client against the Serve app: guidellm (synthetic images, streaming chat completions with
continuous usage stats, the fields it sends) at 4 concurrent streams. Slow: `python -m pytest -m slow
tests/serve/test_guidellm.py`; BENCHMARKS.md records the command and its result. (aiperf 0.13 cannot load a local
tokenizer directory offline, so guidellm is the one run here.)"""

import json
import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

REQUESTS = 24
# guidellm checks GET /health before it starts; on this shared machine a stage may miss the 0.8 s per-stage bound.
pytestmark = pytest.mark.serve_config(args={"health_timeout_s": 10})


def guidellm_command(url: str, out: str, requests: int = REQUESTS, streams: int = 4) -> list[str]:
    return [
        "guidellm", "run",
        "--backend", f"kind=openai_http,target={url},model=crosstrim-tiny",
        "--profile", f"kind=concurrent,streams={streams}",
        "--constraint", f"kind=max_requests,count={requests}",
        "--data", "kind=synthetic_image,width=128,height=128,format=png,output_tokens=16",
        "--tokenizer", f"kind=huggingface_auto,model={ROOT / 'pipeline' / 'assets' / 'tiny-mllama-vqa'}",
        "--output", f"kind=json,path={out}",
        "--disable-console-interactive",
    ]


@pytest.mark.slow
def test_guidellm_synthetic_images(serve_app, tmp_path):
    assert shutil.which("guidellm"), "guidellm is in the test extras"
    out = tmp_path / "guidellm.json"
    cmd = guidellm_command(serve_app.url, str(out))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    print(" ".join(cmd))
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    metrics = bench["metrics"]
    totals = metrics["request_totals"]
    summary = {k: metrics[k]["successful"].get("median") for k in (
        "requests_per_second", "request_latency", "time_to_first_token_ms", "output_tokens_per_second")
        if isinstance(metrics.get(k), dict) and isinstance(metrics[k].get("successful"), dict)}
    print(json.dumps({"request_totals": totals, "medians": summary}, indent=1))
    assert totals["successful"] == REQUESTS and totals["errored"] == 0
