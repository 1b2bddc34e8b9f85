"""Every OpenAI training-file shape read with OpenAI's meaning: normalisation, refusals by line, the report's mapping,
and the samples/openai files through the upload page. The token counter reads tokenizer files only (no weights)."""

import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from datasets_app.examples import held_out_examples, preference_pairs, training_examples
from datasets_app.formats import MESSAGES, PREFERENCE, SHAREGPT, normalise, to_messages, to_preference
from datasets_app.models import Dataset
from datasets_app.services import UploadRejected, dataset_attach_eval_file, dataset_create, dataset_with_held_out
from datasets_app.validation import JsonlValidator
from tests.support import jsonl_file, pc_rows
from tuna_core.errors import Invalid, NotFound
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.prompting import Conversation
from tuna_llm.tokencount import token_counter_for

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "openai"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def counter():
    return token_counter_for(get_base_model_spec())


def validate(rows, counter):
    validator = JsonlValidator(counter)
    validator.feed([row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows])
    return validator.report()


def errors_by_line(report):
    return {e["line"]: e["message"] for e in report["errors"]["items"]}


def chat(i, **extra):
    return {
        "messages": [{"role": "user", "content": f"Say hello to person {i}"}, {"role": "assistant", "content": f"Hello, person {i}!"}],
        **extra,
    }


def tool_line(i):
    return {
        "messages": [
            {"role": "developer", "content": "Use the tools."},
            {"role": "user", "content": f"Weather in city {i}?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "C{i}"}}'}}
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{i}", "content": [{"type": "text", "text": "sunny, 21 C"}]},
            {"role": "assistant", "content": f"It is sunny in city {i}, 21 C."},
        ],
        "tools": TOOLS,
        "parallel_tool_calls": False,
    }


def test_it_reads_weight_developer_name_and_text_parts_with_openais_meaning():
    line = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Bonjour !", "weight": 1},
        ]
    }
    read = normalise(line, MESSAGES)
    assert isinstance(read.conversation, Conversation) and read.conversation.tools is None
    assert list(read.conversation) == [
        {"role": "system", "content": "Be brief.\nAnswer in French."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello!", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Bonjour !"},
    ]
    assert read.targets == 1 and read.notes == {"developer": 1, "parts": 1, "name": 1, "weight0": 1}


def test_it_reads_tool_calls_tool_results_and_the_legacy_function_call():
    conversation = to_messages(tool_line(7), MESSAGES)
    assert conversation.tools == TOOLS
    assert conversation[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"C7"}'}}],
    }
    assert conversation[3] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_7", "name": "get_weather"}
    legacy = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"role": "function", "name": "get_weather", "content": "snow"},
            {"role": "assistant", "content": "It snows in Oslo."},
        ],
        "functions": [TOOLS[0]["function"]],
    }
    read = normalise(legacy, MESSAGES)
    assert read.conversation.tools == TOOLS
    assert read.conversation[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    ]
    assert read.conversation[2] == {"role": "tool", "content": "snow", "tool_call_id": "call_1", "name": "get_weather"}
    assert {"functions", "function_call"} <= set(read.notes)


def test_it_accepts_what_openai_accepts(counter):
    rows = [chat(i) for i in range(12)]
    rows[0] = {
        "messages": [
            {"role": "user", "content": "First part."},
            {"role": "user", "content": "Second part."},
            {"role": "assistant", "content": "Both parts read."},
        ]
    }
    rows[1] = {"messages": [*chat(1)["messages"], {"role": "user", "content": "Thanks!"}]}  # a trailing turn: nothing to learn
    rows[2] = {
        "messages": [*chat(2)["messages"], {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No.", "weight": 0}]
    }
    rows[3] = {"messages": tool_line(3)["messages"][:3], "tools": TOOLS}  # the call is the answer
    report = validate(rows, counter)
    assert report["errors"]["count"] == 0, report["errors"]
    assert to_messages(rows[1], MESSAGES)[-1] == {"role": "assistant", "content": "Hello, person 1!"}
    assert to_messages(rows[2], MESSAGES)[-1] == {"role": "assistant", "content": "Hello, person 2!"}
    assert "messages after the last assistant turn to learn are dropped on 2 lines: nothing is learned from them" in report["mapping"]


def test_it_refuses_what_it_cannot_use_naming_the_line_and_the_reason(counter):
    rows = [chat(i) for i in range(20)]
    user, answer = chat(0)["messages"]
    call = tool_line(0)["messages"][2]
    rows[1] = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}, answer]}
    rows[2] = {"messages": [user, {**answer, "weight": 2}]}
    rows[3] = {"messages": [{**user, "weight": 1}, answer]}
    rows[4] = {"messages": [user, {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}, answer]}
    rows[5] = {"messages": [user, call, {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}, answer]}
    rows[6] = {"messages": [user, call, {"role": "tool", "content": "sunny"}, answer]}
    rows[7] = {
        "messages": [
            user,
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        ]
    }
    rows[8] = {"messages": [user, {"role": "user", "content": "no answer"}]}
    rows[9] = {**chat(9), "tools": [{"type": "retrieval"}]}
    rows[10] = {"messages": [user, {"role": "assistant", "content": [{"type": "text"}]}]}
    errors = errors_by_line(validate(rows, counter))
    assert "message 1, content part 1 is an image (image_url); the base models here read text only" in errors[2]
    assert "message 2 (assistant) has weight 2; a weight is 0 (context, not learned) or 1 (learned)" in errors[3]
    assert 'message 1 (user) has a "weight"; only assistant messages take one' in errors[4]
    assert "message 2 is a tool result but no assistant tool call comes before it" in errors[5]
    assert "message 3 (tool) answers tool_call_id 'call_9', but the assistant turn before it called 'call_0'" in errors[6]
    assert 'message 3 (tool) is missing "tool_call_id"' in errors[7]
    assert "message 2, tool call 1: function 'f': arguments are not a JSON object" in errors[8]
    assert "has no assistant message" in errors[9]
    assert "tool 1 must be" in errors[10] and "only function tools" in errors[10]
    assert 'content part 1 needs "text"' in errors[11]
    assert set(errors) == set(range(2, 12))


def test_it_refuses_a_file_whose_every_assistant_turn_has_weight_zero(counter):
    rows = [{"messages": [m if m["role"] == "user" else {**m, "weight": 0} for m in chat(i)["messages"]]} for i in range(12)]
    report = validate(rows, counter)
    assert report["errors"]["count"] == 1
    assert report["errors"]["items"][0] == {
        "line": None,
        "message": "every assistant turn in the file has weight 0, so there is nothing to learn; give the answers to learn weight 1 (or no weight)",
    }
    assert report["mapping"][1:] == [
        "12 assistant turns have weight 0: kept as context, not learned (12 lines)",
        "12 lines have no assistant turn to learn (every assistant turn has weight 0): kept, they teach nothing",
    ]


def test_it_reports_how_it_read_the_file_and_counts_the_tools_rendering(counter):
    rows = [tool_line(i) for i in range(12)]
    report = validate(rows, counter)
    assert report["errors"]["count"] == 0 and report["format"] == "messages"
    assert report["mapping"] == [
        "OpenAI chat messages, read as OpenAI reads them",
        "developer messages are read as system messages (12 lines)",
        "content given as a list of text parts on 12 lines: the parts are joined with a new line",
        "tools defined on 12 lines; tool calls are rendered with the model's chat template",
        "12 assistant turns call tools (12 lines); tool results are read as tool messages",
        "parallel_tool_calls is set on 12 lines: accepted, it changes nothing in training",
    ]
    plain = validate(
        [{"messages": [m for m in row["messages"] if m["role"] in ("user", "developer")] + [row["messages"][-1]]} for row in rows], counter
    )
    # the tools' descriptions and the calls are in the rendered prompt, so they are counted
    assert report["stats"]["example_tokens"]["min"] > plain["stats"]["example_tokens"]["max"] + 50


def test_it_refuses_tool_lines_naming_the_line_when_the_base_template_cannot_render_tools(counter):
    class NoTools:
        def __getattr__(self, name):
            return getattr(counter, name)

        def tools_unsupported_reason(self):
            return "the chat template of this base model does not render tools"

    rows = [chat(i) for i in range(12)]
    rows[4] = tool_line(4)
    report = validate(rows, NoTools())
    assert errors_by_line(report) == {5: "has tools or tool calls, but the chat template of this base model does not render tools"}


def test_it_reads_openai_preference_lines():
    line = json.loads((SAMPLES / "preference.jsonl").read_text().splitlines()[0])
    prompt, chosen, rejected = to_preference(line)
    assert [m["role"] for m in prompt] == ["system", "user"] and prompt.tools is None
    assert chosen == line["preferred_output"][0] and rejected == line["non_preferred_output"][0]
    assert list(to_messages(line, PREFERENCE)) == [*prompt, chosen]
    with pytest.raises(ValueError, match="are the same answer"):
        to_preference({**line, "non_preferred_output": line["preferred_output"]})
    with pytest.raises(ValueError, match='"preferred_output" has 2 messages'):
        to_preference({**line, "preferred_output": line["preferred_output"] * 2})


def test_it_reads_sharegpt_with_llama_factory_tool_turns():
    line = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": "snow"},
            {"from": "gpt", "value": "It snows in Oslo."},
        ],
        "system": "Use the tools.",
        "tools": json.dumps([TOOLS[0]["function"]]),
    }
    conversation = to_messages(line, SHAREGPT)
    assert conversation.tools == TOOLS
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert conversation[3]["tool_call_id"] == conversation[2]["tool_calls"][0]["id"]
    with pytest.raises(ValueError, match="turn 1 has from 'bot'"):
        to_messages({"conversations": [{"from": "bot", "value": "hi"}]}, SHAREGPT)


def test_it_keeps_legacy_prompt_completion_text_exactly_as_written(counter):
    rows = [{"prompt": f"Order {i}: two shirts\n\n###\n\n", "completion": f" two shirts for order {i} END"} for i in range(10)]
    assert list(to_messages(rows[0], "prompt_completion")) == [
        {"role": "user", "content": "Order 0: two shirts\n\n###\n\n"},
        {"role": "assistant", "content": " two shirts for order 0 END"},
    ]
    assert validate(rows, counter)["errors"]["count"] == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "fmt", "sentence"),
    [
        ("chat_weight.jsonl", "messages", "30 assistant turns have weight 0: kept as context, not learned (30 lines)"),
        ("tools.jsonl", "messages", "tools defined on 30 lines; tool calls are rendered with the model&#x27;s chat template"),
        ("content_parts.jsonl", "messages", "content given as a list of text parts on 30 lines"),
        ("preference.jsonl", "openai_preference", "input messages are the prompt"),
        ("sharegpt.jsonl", "sharegpt", "ShareGPT turns are read as chat messages"),
    ],
)
def test_it_takes_each_openai_sample_through_the_upload_page(alice_client, alice, name, fmt, sentence):
    upload = SimpleUploadedFile(name, (SAMPLES / name).read_bytes())
    response = alice_client.post(reverse("dataset-upload"), {"file": upload}, follow=True)
    dataset = Dataset.objects.get(owner=alice)
    assert dataset.is_valid and dataset.format == fmt and dataset.num_examples == 30, dataset.validation_report["errors"]
    assert dataset.is_preference == (fmt == "openai_preference")
    assert sentence in response.content.decode()
    examples = alice_client.get(reverse("dataset-examples", args=[dataset.pk])).content.decode()
    expected = {
        "chat_weight.jsonl": 'title="weight 0: context, not learned">context<',
        "tools.jsonl": "calls <code>get_order_status</code>",
        "content_parts.jsonl": "Here is the order.\n",
        "preference.jsonl": ">rejected<",
        "sharegpt.jsonl": ">assistant<",
    }[name]
    assert expected in examples
    assert all(isinstance(example, Conversation) for example in training_examples(dataset))


@pytest.mark.django_db
def test_it_escapes_tool_calls_and_rejected_answers_in_the_example_view(alice_client, alice):
    rows = [json.loads(line) for line in (SAMPLES / "preference.jsonl").read_text().splitlines()[:12]]
    rows[0]["non_preferred_output"][0]["content"] = "<script>alert(1)</script>"
    rows[1]["preferred_output"][0] = {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "<b>x</b>", "arguments": '{"q": "<i>"}'}}],
    }
    rows[1]["input"]["tools"] = [{"type": "function", "function": {"name": "<b>x</b>", "description": "<img src=x>"}}]
    dataset = dataset_create(owner=alice, upload=jsonl_file(rows))
    assert dataset.is_valid, dataset.validation_report["errors"]
    html = alice_client.get(reverse("dataset-examples", args=[dataset.pk])).content.decode()
    assert "<script>alert" not in html and "<b>x</b>" not in html and "<img src=x>" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;x&lt;/b&gt;" in html


@pytest.mark.django_db
def test_it_gives_preference_pairs_and_a_dataset_with_a_held_out_file(alice, bob):
    lines = (SAMPLES / "preference.jsonl").read_text().splitlines()
    training = dataset_create(owner=alice, upload=SimpleUploadedFile("train.jsonl", ("\n".join(lines[:25]) + "\n").encode()))
    held = dataset_create(owner=alice, upload=SimpleUploadedFile("valid.jsonl", ("\n".join(lines[:3] + lines[25:]) + "\n").encode()))
    assert not held.is_valid  # 8 examples: too few to train on, fine to hold out

    pairs = preference_pairs(training)
    assert len(pairs) == training.num_train == 20
    first = json.loads(lines[0])
    assert pairs[0] == {
        "messages": first["input"]["messages"],
        "tools": None,
        "chosen": first["preferred_output"][0],
        "rejected": first["non_preferred_output"][0],
        "example_index": 0,
    }

    combined = dataset_with_held_out(owner=alice, training=training, held_out=held)
    assert combined.pk not in (training.pk, held.pk) and combined.is_valid and combined.is_preference
    assert (combined.num_train, combined.num_eval) == (25, 5)  # the 3 held-out lines also in training are not scored
    assert len(preference_pairs(combined)) == 25 and len(held_out_examples(combined)) == 5
    assert combined.validation_report["split"]["source"] == "file"

    chat_file = dataset_create(owner=alice, upload=SimpleUploadedFile("chat.jsonl", (SAMPLES / "sharegpt.jsonl").read_bytes()))
    with pytest.raises(Invalid, match="'valid.jsonl' holds preference data .* and 'chat.jsonl' does not"):
        dataset_with_held_out(owner=alice, training=chat_file, held_out=held)
    with pytest.raises(UploadRejected, match="'train.jsonl' holds preference data"):
        dataset_attach_eval_file(dataset=training, upload=jsonl_file(pc_rows(5), "plain.jsonl"))
    broken = dataset_create(owner=alice, upload=jsonl_file([*pc_rows(12), "{oops"]))
    with pytest.raises(Invalid, match="line 13"):
        dataset_with_held_out(owner=alice, training=broken, held_out=held)
    with pytest.raises(Invalid, match="also occurs in"):
        dataset_with_held_out(owner=alice, training=training, held_out=training)
    with pytest.raises(NotFound):
        dataset_with_held_out(owner=bob, training=training, held_out=held)
    assert (
        Dataset.objects.filter(owner=alice).count() == 5 and not training.has_eval_file and not Dataset.objects.filter(owner=bob).exists()
    )
