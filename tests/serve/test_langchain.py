"""LangChain's ChatOpenAI against the Serve app (no internet): invoke, stream, batch, and with_structured_output
with method="json_schema" (a pydantic schema LangChain turns into response_format, parsed back by LangChain)."""

from typing import Literal

import langchain_openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers import data_url, image, png


class Shape(BaseModel):
    """A shape seen in a picture."""

    shape: Literal["square", "circle", "triangle"]
    row: int = Field(ge=1, le=4)
    filled: bool


def chat_model(serve_app, **fields):
    return langchain_openai.ChatOpenAI(base_url=serve_app.url + "/v1", api_key="unused", model="crosstrim-tiny",
                                       max_retries=0, timeout=300, **fields)


@pytest.fixture()
def llm(serve_app):
    return chat_model(serve_app, max_tokens=8, temperature=0)


def test_invoke_stream_batch(llm):
    message = llm.invoke("what is the shape at row one column three?")
    assert isinstance(message.content, str) and message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.usage_metadata["input_tokens"] > 0
    streamed = "".join(chunk.content for chunk in llm.stream("what is the shape at row one column three?"))
    assert streamed == message.content  # greedy: the same text, streamed
    replies = llm.batch(["how many circles are there?", "where is the red square?"])
    assert len(replies) == 2 and all(isinstance(r.content, str) for r in replies)


def test_with_structured_output_json_schema_and_an_image(serve_app):
    structured = chat_model(serve_app, max_tokens=48, temperature=1.0, seed=5).with_structured_output(
        Shape, method="json_schema", strict=True)
    picture = data_url(png(image(64, 64, 61)))
    for _ in range(3):
        out = structured.invoke([("user", [{"type": "image_url", "image_url": {"url": picture}},
                                           {"type": "text", "text": "describe the shape"}])])
        assert isinstance(out, Shape)
