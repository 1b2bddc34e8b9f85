"""The official openai package against the live test server, streaming included."""

import openai
import pytest
from openai import OpenAI

from tests.support import api_key

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.model]


@pytest.fixture
def openai_client(live_server, alice):
    key = api_key(alice)
    return OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_it_works_with_the_openai_package(openai_client, finetuned_job):
    ids = [m.id for m in openai_client.models.list().data]
    assert "base:smollm2-135m-instruct" in ids and finetuned_job.model_id in ids

    reply = openai_client.chat.completions.create(
        model=finetuned_job.model_id, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = openai_client.chat.completions.create(
        model="base:smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert "Paris" in text and len([p for p in pieces if p]) > 1
    assert finish == "stop" and usage.completion_tokens > 0

    completion = openai_client.completions.create(model="base:smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0

    chunks = list(
        openai_client.completions.create(model="base:smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, stream=True)
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed.strip() == completion.choices[0].text.strip()  # greedy: the same text, in pieces
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 2


def test_it_reports_errors_the_openai_way(openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="tuna-job-424242", messages=[{"role": "user", "content": "hi"}])
    assert "does not exist" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(
            model="base:smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
        )
