"""/v1/chat/completions with tools, tool calls and OpenAI's model names, driven by the official openai package
against the live test server; the calls come from the real embedded model (greedy decoding)."""

import json
import shutil

import openai
import pytest
from openai import OpenAI

from inference_app.api.openai import ChatCompletionsApi, StreamedAnswer
from inference_app.conversation import FieldError, chat_request
from tests.support import api_key
from training_app.services import job_dir
from tuna_llm.training import COMPLETE_MARKER

BASE = "base:smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITIES = [("Paris", "sunny"), ("Rome", "rainy"), ("Madrid", "windy"), ("Oslo", "cold")]


def history(cities=CITIES) -> list[dict]:
    """Earlier turns in which the assistant answered each weather question with a call, then with its result."""
    messages = [{"role": "developer", "content": "You are a helpful assistant."}]
    for index, (city, weather) in enumerate(cities):
        call_id = f"call_{index}"
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"What is the weather in {city}?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": weather},
            {"role": "assistant", "content": f"It is {weather} in {city}."},
        ]
    return messages


ASK_BERLIN = {"role": "user", "content": "What is the weather in Berlin?"}


@pytest.fixture
def openai_client(live_server, alice):
    key = api_key(alice)
    return OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import prepare_embedded_model

    return AutoTokenizer.from_pretrained(prepare_embedded_model(get_base_model_spec()))


@pytest.fixture
def base_gguf(settings):
    """The embedded base model's f16 GGUF, as the first export of any of its fine-tunes converts it (as in
    test_llamacpp_serving; the session's GGUF folder is shared, so it is converted once)."""
    from pathlib import Path

    from inference_app import engines
    from training_app import exports
    from tuna_llm import gguf_export
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.serving.registry import registry

    path = exports.base_gguf_dir(settings.TUNA_DEFAULT_BASE_MODEL) / engines.BASE_GGUF
    if not path.is_file():
        registry.get()  # the embedded model is prepared on first load
        gguf_export.convert_model(Path(get_base_model_spec().load_path), path, "f16")
    return path.resolve()


# -- the request, checked and rendered -------------------------------------------------------------
def test_it_normalises_an_openai_request_into_a_conversation():
    request = chat_request([*history(CITIES[:1]), ASK_BERLIN], tools=[WEATHER], parallel_tool_calls=False)
    conversation = request.conversation
    assert conversation.tools == [WEATHER] and request.tool_choice == "auto" and request.reads_calls
    assert conversation[0] == {"role": "system", "content": "You are a helpful assistant."}  # developer: as system
    assert conversation[1] == {"role": "user", "content": "What is the weather in Paris?"}  # text parts joined
    assert conversation[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
    }
    assert conversation[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}
    # tool_choice "none": the tools are not offered and the answer is not read for calls.
    quiet = chat_request([*history(CITIES[:1]), ASK_BERLIN], tools=[WEATHER], tool_choice="none")
    assert quiet.conversation.tools is None and not quiet.reads_calls and quiet.tools == [WEATHER]


@pytest.mark.parametrize(
    ("messages", "tools", "choice", "param", "says"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            None,
            None,
            "messages[0].content[0]",
            "read text",
        ),
        ([{"role": "wizard", "content": "hi"}], None, None, "messages[0].role", "developer"),
        ([{"role": "user", "content": None}], None, None, "messages[0].content", "required"),
        ([{"role": "tool", "tool_call_id": "call_9", "content": "x"}], None, None, "messages[0].tool_call_id", "answers no call"),
        (history(CITIES[:1])[:3], None, None, "messages[2].tool_calls[0]", "has no answer"),
        (
            [{"role": "user", "content": "hi"}],
            [{"type": "function", "function": {"name": "bad name"}}],
            None,
            "tools[0].function.name",
            "64",
        ),
        (
            [{"role": "user", "content": "hi"}],
            [{"type": "function", "function": {"name": "f", "parameters": []}}],
            None,
            "tools[0].function.parameters",
            "object",
        ),
        ([{"role": "user", "content": "hi"}], [WEATHER], "required", "tool_choice", '"auto" or "none"'),
        ([{"role": "user", "content": "hi"}], [WEATHER], {"type": "function", "function": {"name": "f"}}, "tool_choice", "not supported"),
        ([{"role": "user", "content": "hi"}], None, "auto", "tool_choice", "no tools"),
    ],
)
def test_it_refuses_a_bad_request_naming_the_field(messages, tools, choice, param, says):
    with pytest.raises(FieldError) as caught:
        chat_request(messages, tools=tools, tool_choice=choice)
    assert caught.value.param == param and says in str(caught.value)


def test_it_refuses_arguments_that_are_not_a_json_object():
    messages = history(CITIES[:1])
    messages[2]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    with pytest.raises(FieldError) as caught:
        chat_request(messages)
    assert caught.value.param == "messages[2].tool_calls[0].function.arguments"


@pytest.mark.model
def test_it_renders_tools_calls_and_results_with_the_models_template(tokenizer):
    from tuna_llm.prompting import render_chat

    request = chat_request([*history(CITIES[:1]), ASK_BERLIN], tools=[WEATHER])
    prompt = render_chat(tokenizer, request.conversation, add_generation_prompt=True)
    assert prompt.count("You are a helpful assistant.") == 1 and "The current weather in a city." in prompt  # the tool offered
    assert '"arguments": {"city":"Paris"}' in prompt and "sunny" in prompt and "It is sunny in Paris." in prompt
    assert prompt.index("Paris?") < prompt.index('{"city":"Paris"}') < prompt.index("sunny") < prompt.index("Berlin?")
    assert prompt.endswith("<|im_start|>assistant\n")
    quiet = render_chat(
        tokenizer,
        chat_request([*history(CITIES[:1]), ASK_BERLIN], tools=[WEATHER], tool_choice="none").conversation,
        add_generation_prompt=True,
    )
    assert "The current weather in a city." not in quiet and '{"city":"Paris"}' in quiet  # not offered; the history stays


def test_it_streams_text_as_content_and_a_call_as_tool_call_deltas():
    chat = chat_request([ASK_BERLIN], tools=[WEATHER])

    def streamed(pieces):
        answer = StreamedAnswer(chat, ChatCompletionsApi.delta)
        deltas = [d["delta"] for piece in pieces for d in answer.feed(piece)] + [d["delta"] for d in answer.end()]
        return deltas, answer.finish_reason("stop")

    # A call split anywhere, its opening tag included: nothing goes out as content, the call goes out whole.
    deltas, finish = streamed(["<", "tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Berlin"}}\n</tool_call>'])
    assert finish == "tool_calls" and all("content" not in d for d in deltas)
    head, arguments = deltas
    assert head["tool_calls"][0]["index"] == 0 and head["tool_calls"][0]["id"].startswith("call_")
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert arguments["tool_calls"][0] == {"index": 0, "function": {"arguments": '{"city":"Berlin"}'}}
    # Text streams as it comes; a "<" that turns out not to open a call goes out once that is known.
    deltas, finish = streamed(["It is ", "<", "b>sunny</b>"])
    assert finish == "stop" and "".join(d["content"] for d in deltas) == "It is <b>sunny</b>"
    assert deltas[0] == {"content": "It is "}
    # A block that is no call (not JSON) is text after all.
    deltas, finish = streamed(["<tool_call>\nnot json\n</tool_call>"])
    assert finish == "stop" and "".join(d["content"] for d in deltas) == "<tool_call>\nnot json\n</tool_call>"


# -- the live server --------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_it_answers_bad_requests_with_openai_error_objects(openai_client):
    bad = [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [ASK_BERLIN], "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
        ({"messages": [ASK_BERLIN], "tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}, "messages[0].tool_call_id"),
        ({"messages": [ASK_BERLIN], "functions": [WEATHER["function"]]}, "functions"),
    ]
    for body, param in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.chat.completions.create(model=BASE, max_tokens=4, **body)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error", body
        assert error["message"].startswith(f"{param}: ")


def assert_berlin_call(calls):
    [call] = calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Berlin"}


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_returns_the_models_tool_calls_on_both_engines_streamed_or_not(openai_client, settings, base_gguf, tokenizer):
    from tuna_llm.prompting import render_chat
    from tuna_llm.serving import llama_server
    from tuna_llm.serving.engine import CallSpec

    # Earlier turns in which the assistant answered each weather question with a call: the model, greedy, calls too.
    messages = [*history(), ASK_BERLIN]
    ask = {"model": BASE, "messages": messages, "tools": [WEATHER], "max_tokens": 40, "temperature": 0}
    settings.TUNA_SERVING_ENGINE = "transformers"
    reply = openai_client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert reply.engine == "transformers" and choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_berlin_call(choice.message.tool_calls)
    assert reply.usage.completion_tokens > 0

    # llama.cpp renders with the GGUF's template (LLM Tuna's tools-capable one): the very prompt transformers gets.
    served, _ = llama_server.pool.engine_for(base_gguf, None)
    conversation = chat_request(messages, tools=[WEATHER]).conversation
    expected = render_chat(tokenizer, conversation, add_generation_prompt=True)
    prompt = served.prompts.render(CallSpec(messages=conversation))
    assert served.prompts.renders_tools and prompt == expected
    assert served.prompts.count(prompt) == len(tokenizer(expected, add_special_tokens=False)["input_ids"])
    settings.TUNA_SERVING_ENGINE = "llamacpp"
    reply = openai_client.chat.completions.create(**ask)
    assert reply.engine == "llama.cpp" and reply.choices[0].finish_reason == "tool_calls"
    assert_berlin_call(reply.choices[0].message.tool_calls)

    calls, content, finish, usage = {}, [], None, None
    for chunk in openai_client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for streamed in chunk.choices:
            content.append(streamed.delta.content or "")
            finish = streamed.finish_reason or finish
            for delta in streamed.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = delta.id or entry["id"]
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and not "".join(content) and usage.completion_tokens == reply.usage.completion_tokens
    assert list(calls) == [0] and calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == reply.choices[0].message.tool_calls[0].function.arguments

    # tool_choice "none": the same history, no tools offered, and the answer is text, never read for calls.
    text = openai_client.chat.completions.create(**{**ask, "tool_choice": "none", "max_tokens": 12})
    assert text.choices[0].message.tool_calls is None and text.choices[0].finish_reason in ("stop", "length")


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_serves_a_fine_tune_and_its_checkpoint_by_their_ft_names(openai_client, finetuned_job, trained_adapter, bob):
    name = finetuned_job.fine_tuned_model
    assert name == f"ft:{finetuned_job.base_model}:alice::ftjob-{finetuned_job.pk}"
    ids = [m.id for m in openai_client.models.list().data]
    assert finetuned_job.model_id in ids and name in ids

    ask = [{"role": "user", "content": "What is the capital of France?"}]
    by_name = openai_client.chat.completions.create(model=name, messages=ask, max_tokens=12)
    by_id = openai_client.chat.completions.create(model=finetuned_job.model_id, messages=ask, max_tokens=12)
    assert by_name.model == name and by_name.choices[0].message.content == by_id.choices[0].message.content

    # A kept checkpoint answers under the job's name with :ckpt-step-<n>, from its own adapter directory.
    kept = job_dir(finetuned_job) / "checkpoints" / "checkpoint-4"
    shutil.copytree(trained_adapter, kept)
    (kept / COMPLETE_MARKER).touch()
    checkpoint = openai_client.chat.completions.create(model=f"{name}:ckpt-step-4", messages=ask, max_tokens=12)
    assert checkpoint.model == f"{name}:ckpt-step-4" and checkpoint.choices[0].message.content == by_id.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model=f"{name}:ckpt-step-5", messages=ask, max_tokens=4)
    assert "no kept checkpoint at step 5" in caught.value.message

    # A name that is not the job's, or another user's job by its own name: "does not exist", as for tuna-job-<n>.
    wrong = f"ft:{finetuned_job.base_model}:alice:x:ftjob-{finetuned_job.pk}"
    finetuned_job.owner = bob
    finetuned_job.save(update_fields=["owner"])
    for other in (wrong, name.replace(":alice:", ":bob:")):
        with pytest.raises(openai.NotFoundError) as caught:
            openai_client.chat.completions.create(model=other, messages=ask, max_tokens=4)
        assert "does not exist" in caught.value.message


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_refuses_tools_for_a_base_whose_template_cannot_render_them(openai_client, monkeypatch):
    from tuna_llm.serving.registry import registry

    # The served base with a chat template that reads role and content only (no ChatML, no tools).
    monkeypatch.setattr(
        registry.get().tokenizer, "chat_template", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=BASE, messages=[ASK_BERLIN], tools=[WEATHER], max_tokens=4)
    assert caught.value.body["param"] == "tools" and "does not render tools" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=BASE, messages=history(CITIES[:1]), max_tokens=4)
    assert caught.value.body["param"] == "messages" and "does not render tools" in caught.value.message
