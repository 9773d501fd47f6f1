"""lm-evaluation-harness as a real client of the Serve app (slow; needs the `eval` extra): the repository's local
tasks (configs/lm_eval/) scored over HTTP, multiple choice by log-likelihood through local-completions (several
prompts a request, echo, logprobs) and a generation task with images through local-chat-completions, trimmed and
untrimmed. A loglikelihood lm-eval logged equals HF's forward on the same tokens (1e-4).

    pip install -c constraints.txt -e ".[eval]" && python -m pytest -m slow tests/serve/test_lm_eval.py -s
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
MODEL = "crosstrim-tiny"
TOKENIZER = ROOT / "pipeline" / "assets" / "tiny-mllama-vqa"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}


def lm_eval(out, *args: str) -> dict:
    """`python -m lm_eval ARGS` from the repository root (the tasks' data paths are relative to it); its results."""
    cmd = [sys.executable, "-m", "lm_eval", "--include_path", "configs/lm_eval", "--output_path", str(out),
           "--log_samples", *args]
    print("$", " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=3600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = out.rglob("results_*.json")
    samples = {p.name.removeprefix("samples_").rsplit("_", 1)[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in out.rglob("samples_*.jsonl")}
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


@pytest.fixture(scope="module")
def hf_model():
    from pipeline.config import ModelConfig
    from pipeline.model.loader import load_model

    return load_model(ModelConfig(source="bundled:tiny-mllama-vqa"), parts=("text",)).model


def test_lm_eval_scores_the_served_model(serve_app, tmp_path, hf_model):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the `eval` extra: pip install -e '.[eval]'")
    from transformers import AutoTokenizer

    from tests.helpers import meta_reference

    url = serve_app.url
    mc = lm_eval(tmp_path / "mc", "--model", "local-completions", "--tasks", "shapes_kind", "--batch_size", "8",
                 "--model_args", f"model={MODEL},base_url={url}/v1/completions,tokenizer={TOKENIZER},"
                 "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1,timeout=600")
    scores = {"shapes_kind acc": mc["results"]["shapes_kind"]["acc,none"]}
    # One logged document: lm-eval's loglikelihood of each choice == HF's forward on the same tokens.
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    doc = mc["samples"]["shapes_kind"][0]
    pairs = [(a["arg_0"], a["arg_1"]) for a in doc["arguments"].values()]  # (context, continuation) per choice
    assert len(pairs) == len(doc["resps"]) == 4
    for (context, continuation), ((ll, _),) in zip(pairs, doc["resps"]):
        spaces = len(context) - len(context.rstrip())  # lm-eval's _encode_pair: trailing whitespace is scored
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        with torch.no_grad(), meta_reference(hf_model):
            logp = torch.log_softmax(hf_model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert abs(float(ll) - want) < 1e-4 * len(whole)
    chat_args = f"model={MODEL},base_url={url}/v1/chat/completions,max_images=1,max_retries=1,timeout=600"
    for name, extra in (("trimmed", []), ("untrimmed", ["--gen_kwargs", "trim='none'"])):
        gen = lm_eval(tmp_path / name, "--model", "local-chat-completions", "--tasks", "shapes_vqa",
                      "--apply_chat_template", "--model_args", chat_args, *extra)
        scores[f"shapes_vqa exact_match ({name})"] = gen["results"]["shapes_vqa"]["exact_match,none"]
    print(json.dumps(scores, indent=1))
    assert scores["shapes_kind acc"] > 0.5  # one answer of each of 4 kinds: chance is 0.25
    assert scores["shapes_vqa exact_match (untrimmed)"] > 0.3
