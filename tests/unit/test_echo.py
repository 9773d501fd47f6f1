"""Text completions for evaluation without Serve: `echo` with the prompt's logprobs in the legacy shape (the first
null, the stop token listed as vLLM's), vLLM's prompt_logprobs shape, several prompts in one body and one stream
(choices prompt-major), and the request fields' rules."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from deployments.api import ChatCompletionRequest, CompletionRequest, to_sampling_params
from deployments.completions import TextPrompt, TextRenderer, text_body, text_ending
from deployments.responses import Accumulator, DecoderStream, TokenBytes, chunks, drain, merged, sse_events
from pipeline.types import PromptLogprob, RequestOutput
from tests.unit.test_responses import FakeItems

SCORES = [PromptLogprob(6, -1.0, 2, [(9, -0.5)]), PromptLogprob(7, -0.2, 1, [(7, -0.2)])]
PROMPT = TextPrompt("ab", [5, 6, 7])


class Vocab(TokenBytes):
    """TokenBytes over a toy vocabulary: token id i is the text f"t{i}"."""

    def __init__(self):
        pass

    def __call__(self, token_id):
        return {"token": f"t{token_id}", "bytes": list(f"t{token_id}".encode())}


def scored(index=0, stop=2, prompt_logprobs=SCORES, tokens=(), prompt_tokens=3):
    """A completion's one output: ended by stop token `stop` (its logprob listed) after `tokens`."""
    return RequestOutput("r", list(tokens), "".join(f"t{t}" for t in tokens), True, "stop", prompt_tokens=prompt_tokens,
                         completion_tokens=len(tokens) + 1, logprobs=[-0.5] * len(tokens) + [-0.3],
                         top_logprobs=[[(t, -0.5)] for t in tokens] + [[(2, -0.1)]], index=index,
                         prompt_logprobs=prompt_logprobs, stop_token_id=stop)


def body(req, outputs, prompt=PROMPT):
    render = TextRenderer(req, "cmpl-1", "m", Vocab(), prompt)
    stream = DecoderStream(FakeItems(outputs[1:]), outputs[0], None)
    acc = asyncio.run(drain(stream, Accumulator(req.n), 1))
    return text_body([render], [acc])


def test_echo_with_logprobs_is_the_legacy_shape_lm_eval_reads():
    req = CompletionRequest(prompt="ab", echo=True, logprobs=1, max_tokens=1)
    (c,) = body(req, [scored()])["choices"]
    lp = c["logprobs"]
    assert c["text"] == "ab" and "prompt_logprobs" not in c
    assert lp["tokens"] == ["t5", "t6", "t7", "t2"]  # the prompt, then the stop token the completion ended with
    assert lp["token_logprobs"] == [None, -1.0, -0.2, -0.3]
    assert lp["top_logprobs"] == [None, {"t6": -1.0, "t9": -0.5}, {"t7": -0.2}, {"t2": -0.1}]
    assert lp["text_offset"] == [0, 2, 4, 6]
    # lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs: continuation = token_logprobs[ctxlen:-1]
    ctxlen = 1
    assert sum(lp["token_logprobs"][ctxlen:-1]) == -1.2
    assert [t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1])
            ] == [False, True]


def test_prompt_logprobs_in_vllms_shape():
    req = CompletionRequest(prompt="ab", prompt_logprobs=1, max_tokens=0)
    (c,) = body(req, [scored(stop=None, prompt_logprobs=SCORES)])["choices"]
    assert c["text"] == "" and c["logprobs"] is None
    assert json.loads(json.dumps(c["prompt_logprobs"])) == [
        None,
        {"6": {"logprob": -1.0, "rank": 2, "decoded_token": "t6"}, "9": {"logprob": -0.5, "rank": 1,
                                                                         "decoded_token": "t9"}},
        {"7": {"logprob": -0.2, "rank": 1, "decoded_token": "t7"}}]


def test_several_prompts_in_one_body_and_one_stream():
    req = CompletionRequest(prompt=["ab", "cd"], echo=True, n=2, max_tokens=3, stream=True,
                            stream_options={"include_usage": True})
    prompts = [PROMPT, TextPrompt("cd", [8, 9])]
    renders = [TextRenderer(req, "cmpl-1", "m", Vocab(), p, i * 2) for i, p in enumerate(prompts)]

    def outputs(p):
        return [scored(0, None, None, [p + 1], 3 - p), scored(1, None, None, [p + 2], 3 - p)]

    def streams():
        return [DecoderStream(FakeItems(outputs(p)[1:]), outputs(p)[0], None) for p in range(2)]

    accs = [Accumulator(2) for _ in prompts]

    async def both():
        await asyncio.gather(*(drain(s, a, 1) for s, a in zip(streams(), accs)))

    asyncio.run(both())
    full = text_body(renders, accs)
    assert [(c["index"], c["text"]) for c in full["choices"]] == [(0, "abt1"), (1, "abt2"), (2, "cdt2"), (3, "cdt3")]
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 0}}

    accs = [Accumulator(2) for _ in prompts]
    items = merged([chunks(s, a, r) for s, a, r in zip(streams(), accs, renders)])

    async def run():
        return [e async for e in sse_events(items, renders[0].frame, lambda: text_ending(renders, accs))]

    events = [json.loads(e[6:]) for e in asyncio.run(run()) if e.startswith("data: {")]
    texts = {ch["choices"][0]["index"]: ch["choices"][0]["text"] for ch in events if ch["choices"]}
    assert texts == {0: "abt1", 1: "abt2", 2: "cdt2", 3: "cdt3"}
    assert events[-1]["usage"]["total_tokens"] == 13


def test_request_rules():
    ids = CompletionRequest(prompt=[[1, 2], [3]])
    assert ids.prompts == [[1, 2], [3]] and CompletionRequest(prompt=[1, 2]).prompts == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts == ["a", "b"]
    with pytest.raises(ValidationError, match="empty"):
        CompletionRequest(prompt=["a", ""])
    with pytest.raises(ValidationError, match="needs echo or prompt_logprobs"):
        CompletionRequest(prompt="a", max_tokens=0)
    with pytest.raises(ValidationError, match="stream"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], prompt_logprobs=1, stream=True)
    echo = to_sampling_params(CompletionRequest(prompt="a", echo=True, logprobs=2, max_tokens=0), 16)
    assert echo.max_tokens == 0 and echo.prompt_logprobs == 2 and echo.top_logprobs == 2  # vLLM's rule
    assert to_sampling_params(CompletionRequest(prompt="a", echo=True), 16).prompt_logprobs is None
    chat = to_sampling_params(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], prompt_logprobs=0,
                                                    max_tokens=0), 16)
    assert chat.prompt_logprobs == 0 and chat.max_tokens == 0
