"""Tools and weights in the model layer, on the embedded model's real tokenizer: LLM Tuna's ChatML-with-tools
template (rendering, its Modelfile and GGUF copies), tool-call parsing and comparison, and weight-0 turns."""

from __future__ import annotations

import json

import pytest

from tuna_llm.catalog import find_embedded_gguf, get_base_model_spec
from tuna_llm.ollama import modelfile, ollama_chat
from tuna_llm.prompting import (
    Conversation,
    ToolsUnsupported,
    answer_text,
    chat_template_for,
    has_tool_content,
    render_chat,
    tools_unsupported_reason,
)
from tuna_llm.tests.modelfile import ollama_prompt, parse_modelfile
from tuna_llm.toolcalls import calls_match, calls_of, canonical_arguments, openai_tool_calls, parse_tool_calls
from tuna_llm.training import IGNORE_INDEX, save_tokenizer, tokenize_example

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(id_: str, name: str, arguments: dict) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": canonical_arguments(arguments)}}


TOOLS_CONVERSATION = Conversation(
    [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("c1", "get_weather", {"city": "Paris"}), call("c2", "get_weather", {"city": "Lyon"})],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20C"},
        {"role": "assistant", "content": "Paris 18C, Lyon 20C."},
    ],
    tools=[WEATHER],
)
PLAIN_CONVERSATIONS = [
    [{"role": "user", "content": "Turn 'two pizzas' into JSON."}],
    [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Two pizzas, one salad"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What would you like?"},
        {"role": "user", "content": "A pizza\nand a salad, please."},
        {"role": "assistant", "content": '{"pizza": 1, "salad": 1}'},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{{ not jinja }} <|im_end|>"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}, {"role": "system", "content": "Late."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded model's tokenizer: from its converted folder when there is one, else from the GGUF (no weights)."""
    from transformers import AutoTokenizer

    prepared = get_base_model_spec().prepared_dir
    if (prepared / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(prepared), local_files_only=True)
    gguf = find_embedded_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


class Templated:
    """The real tokenizer rendering with another chat template."""

    def __init__(self, tokenizer, template: str | None) -> None:
        self.tokenizer, self.chat_template = tokenizer, template

    def apply_chat_template(self, messages, chat_template=None, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template or self.chat_template, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


# --- Rendering


@pytest.mark.parametrize("index", range(len(PLAIN_CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_it_renders_conversations_without_tools_exactly_as_the_model_s_own_template(tokenizer, index, add_generation_prompt):
    messages = PLAIN_CONVERSATIONS[index]
    own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    variant = tokenizer.apply_chat_template(
        messages, chat_template=chat_template_for(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert variant == own
    assert render_chat(tokenizer, Conversation(messages), add_generation_prompt=add_generation_prompt) == own


def test_it_renders_tools_calls_and_results_in_the_tool_call_convention(tokenizer):
    assert chat_template_for(tokenizer) != tokenizer.chat_template and tools_unsupported_reason(tokenizer) is None
    text = render_chat(tokenizer, TOOLS_CONVERSATION, add_generation_prompt=False)
    tools_line = json.dumps(json.loads(json.dumps(WEATHER, sort_keys=True)))  # Python's spacing, keys sorted
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n\n")
    assert f"<tools>\n{tools_line}\n</tools>" in text
    assert text.endswith(
        "<|im_end|>\n<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Lyon"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n20C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 18C, Lyon 20C.<|im_end|>\n"
    )
    # The tools go at the end of a given system message too; the prompt of a slice keeps them.
    with_system = Conversation([{"role": "system", "content": "Be brief."}, *TOOLS_CONVERSATION[:1]], tools=[WEATHER])
    assert render_chat(tokenizer, with_system, add_generation_prompt=True).startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>" in render_chat(tokenizer, TOOLS_CONVERSATION[:1], add_generation_prompt=True)


def test_it_writes_an_answer_as_the_template_writes_it_after_the_generation_prompt(tokenizer):
    prompt = render_chat(tokenizer, TOOLS_CONVERSATION[:1], add_generation_prompt=True)
    for answer in (
        TOOLS_CONVERSATION[1],
        {"role": "assistant", "content": "Checking.", **{"tool_calls": TOOLS_CONVERSATION[1]["tool_calls"]}},
    ):
        full = render_chat(tokenizer, Conversation([*TOOLS_CONVERSATION[:1], answer], tools=[WEATHER]), add_generation_prompt=False)
        assert full == prompt + answer_text(answer) + "<|im_end|>\n"
        content, calls = parse_tool_calls(answer_text(answer))
        assert content == answer["content"] and calls_match(calls, calls_of(answer))


def test_it_refuses_tool_content_a_template_cannot_render_and_uses_one_that_can_as_it_is(tokenizer):
    llama2 = "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    refusing = Templated(tokenizer, llama2)
    assert "does not render tools or tool calls" in tools_unsupported_reason(refusing)
    assert chat_template_for(refusing) == llama2
    with pytest.raises(ToolsUnsupported, match="choose a base model whose chat template supports tools"):
        render_chat(refusing, TOOLS_CONVERSATION, add_generation_prompt=True)
    assert render_chat(refusing, [{"role": "user", "content": "Hi"}], add_generation_prompt=True) == "[INST] Hi [/INST]"

    capable = (
        "{% for t in tools or [] %}<tool>{{ t['function']['name'] }}</tool>{% endfor %}{% for m in messages %}<{{ m['role'] }}>"
        "{{ m['content'] }}{% for c in m['tool_calls'] or [] %}[{{ c['function']['name'] }}]{% endfor %}</s>{% endfor %}"
    )
    own = Templated(tokenizer, capable)
    assert tools_unsupported_reason(own) is None and chat_template_for(own) == capable
    assert (
        render_chat(own, TOOLS_CONVERSATION[:2], add_generation_prompt=False)
        == "<tool>get_weather</tool><user>Weather in Paris and Lyon?</s><assistant>[get_weather][get_weather]</s>"
    )

    # A fine-tune's saved tokenizer carries LLM Tuna's template, which renders tools itself: it is kept as it is.
    saved = Templated(tokenizer, chat_template_for(tokenizer))
    assert tools_unsupported_reason(saved) is None and chat_template_for(saved) == saved.chat_template
    assert render_chat(saved, TOOLS_CONVERSATION, add_generation_prompt=True) == render_chat(
        tokenizer, TOOLS_CONVERSATION, add_generation_prompt=True
    )

    with pytest.raises(ToolsUnsupported, match="no chat template"):
        render_chat(Templated(tokenizer, None), TOOLS_CONVERSATION, add_generation_prompt=True)
    # A ChatML template whose opening LLM Tuna's variant does not reproduce is refused, not approximated.
    bos_chatml = "<s>" + tokenizer.chat_template
    assert "opening is not plain ChatML" in tools_unsupported_reason(Templated(tokenizer, bos_chatml))


def test_it_keeps_the_tools_of_a_conversation_through_slices_and_json():
    assert TOOLS_CONVERSATION[:-1].tools == [WEATHER] and has_tool_content(TOOLS_CONVERSATION[:1])
    assert not has_tool_content(Conversation([{"role": "user", "content": "hi"}]))
    again = Conversation.from_json(json.loads(json.dumps(TOOLS_CONVERSATION.to_json())))
    assert again == TOOLS_CONVERSATION and again.tools == [WEATHER]
    assert "tools" not in Conversation([{"role": "user", "content": "hi"}]).to_json()
    assert Conversation.from_json([{"role": "user", "content": "hi"}]).tools is None


# --- Tool calls


def test_it_parses_tool_calls_and_leaves_malformed_blocks_in_the_content():
    text = 'Let me check.\n<tool_call>  {"name": "get_weather", "arguments": {"city": "Paris"}}\n\n</tool_call>\n<tool_call>\n{"name": "f", "arguments": "{\\"b\\": 1}"}\n</tool_call>'
    assert parse_tool_calls(text) == (
        "Let me check.",
        [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {"b": 1}}],
    )
    broken = 'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call> done'
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name: not a call
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')[1] == []
    assert parse_tool_calls("  plain answer \n") == ("plain answer", [])


def test_it_compares_calls_on_names_and_arguments_as_json():
    a = {"name": "f", "arguments": {"x": 1, "y": [1, 2]}}
    b = {"name": "g", "arguments": {}}
    assert calls_match([a, b], [b, {"name": "f", "arguments": '{"y": [1,2], "x": 1}'}])
    assert not calls_match([a], [{"name": "f", "arguments": {"x": 1, "y": [2, 1]}}])
    assert not calls_match([a, a], [a]) and not calls_match([a], [{"name": "h", "arguments": a["arguments"]}])
    assert calls_match([], [])


def test_it_writes_canonical_arguments_and_openai_calls():
    assert canonical_arguments('{"b": 1, "a": {"d": "é", "c": null}}') == '{"a":{"c":null,"d":"é"},"b":1}'
    with pytest.raises(ValueError, match="arguments are not a JSON object: .* is a JSON list"):
        canonical_arguments("[1, 2]")
    with pytest.raises(ValueError, match="arguments are not a JSON object: '{city' is not valid JSON"):
        canonical_arguments("{city")
    made = openai_tool_calls([{"name": "f", "arguments": {"b": 2, "a": 1}}, {"name": "f", "arguments": {}}])
    assert [c["function"] for c in made] == [{"name": "f", "arguments": '{"a":1,"b":2}'}, {"name": "f", "arguments": "{}"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in made) and made[0]["id"] != made[1]["id"]
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"a": 1}'}}
    assert calls_of(legacy) == [{"name": "f", "arguments": {"a": 1}}]
    assert answer_text(legacy) == '<tool_call>\n{"name": "f", "arguments": {"a":1}}\n</tool_call>'


# --- Training rows


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX])


def test_it_learns_tool_calls_as_rendered_and_never_tool_results_or_tools(tokenizer):
    row = tokenize_example(tokenizer, TOOLS_CONVERSATION, 2048)
    assert tokenizer.decode(row["input_ids"]) == render_chat(tokenizer, TOOLS_CONVERSATION, add_generation_prompt=False)
    expected = answer_text(TOOLS_CONVERSATION[1]) + "<|im_end|>\n" + "Paris 18C, Lyon 20C.<|im_end|>\n"
    assert labelled_text(tokenizer, row) == expected
    call_tokens = tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]
    assert set(call_tokens) <= {label for label in row["labels"] if label != IGNORE_INDEX}


def test_it_never_labels_a_weight_0_turn(tokenizer):
    conversation = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Lyon.", "weight": 0},
        {"role": "user", "content": "Wrong, try again."},
        {"role": "assistant", "content": "Paris."},
    ]
    row = tokenize_example(tokenizer, conversation, 512)
    assert labelled_text(tokenizer, row) == "Paris.<|im_end|>\n"
    assert (
        row["input_ids"]
        == tokenize_example(tokenizer, [{k: v for k, v in m.items() if k != "weight"} for m in conversation], 512)["input_ids"]
    )
    assert tokenize_example(tokenizer, [*conversation[:3], {**conversation[3], "weight": 0}], 512) is None
    # With a template that is not prefix-stable, the last learned turn is learned alone.
    shifting = Templated(tokenizer, "{% for m in messages %}{{ m['role'] }}{{ loop.length }}: {{ m['content'] }}\n{% endfor %}")
    fallback = tokenize_example(shifting, [*conversation, {"role": "assistant", "content": "Really.", "weight": 0}], 512)
    assert tokenizer.decode(
        [t for t, label in zip(fallback["input_ids"], fallback["labels"], strict=True) if label != IGNORE_INDEX]
    ).startswith("Paris.")


@pytest.mark.model
def test_it_takes_no_loss_from_a_weight_0_turn():
    import torch

    from tuna_llm.loading import load_tokenizer_and_model, pick_device
    from tuna_llm.training import PadCollator, answer_tokens_loss

    tokenizer, model = load_tokenizer_and_model(get_base_model_spec(), pick_device("fp32"))
    context = [{"role": "user", "content": "Two mugs"}, {"role": "assistant", "content": '{"item": "mug", "qty": 2}'}]
    conversation = [*context, {"role": "user", "content": "And three caps"}, {"role": "assistant", "content": '{"item": "cap", "qty": 3}'}]
    weighted = [conversation[0], {**conversation[1], "weight": 0}, *conversation[2:]]
    every, masked = tokenize_example(tokenizer, conversation, 512), tokenize_example(tokenizer, weighted, 512)
    assert masked["input_ids"] == every["input_ids"]
    # The first answer's tokens, masked by hand: where the first turn's prompt ends and its answer ends.
    start = len(tokenizer(render_chat(tokenizer, context[:1], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    end = len(tokenizer(render_chat(tokenizer, context, add_generation_prompt=False), add_special_tokens=False)["input_ids"])
    by_hand = {**every, "labels": every["labels"][:start] + [IGNORE_INDEX] * (end - start) + every["labels"][end:]}
    assert masked["labels"] == by_hand["labels"] and every["labels"][start:end] != [IGNORE_INDEX] * (end - start)

    collate = PadCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        loss_masked, loss_by_hand, loss_every = (answer_tokens_loss(model, collate([row])).item() for row in (masked, by_hand, every))
    assert loss_masked == pytest.approx(loss_by_hand, rel=1e-6)
    assert loss_masked != pytest.approx(loss_every, rel=1e-3)


# --- The same template in the Modelfile, the adapter and the GGUF


def test_it_writes_a_modelfile_that_renders_tools_conversations_as_render_chat(tokenizer):
    chat = ollama_chat(tokenizer, tools=True)
    assert parse_modelfile(modelfile(chat, model_file="base-f16.gguf", adapter_file="adapter-f16.gguf")).value("template") == chat.template
    assert chat.system == DEFAULT_SYSTEM and chat.stops == ("<|im_end|>",)
    for conversation in (
        TOOLS_CONVERSATION,
        TOOLS_CONVERSATION[:3],
        Conversation([{"role": "system", "content": "Be brief."}, *TOOLS_CONVERSATION], tools=[WEATHER]),
    ):
        expected = render_chat(tokenizer, conversation, add_generation_prompt=True)
        got = ollama_prompt(chat.template, conversation, system=chat.system, tools=conversation.tools)
        # Ollama writes the tools' JSON with Go's encoder (no spaces): the same objects, otherwise the same text.
        expected_lines, got_lines = expected.split("\n"), got.split("\n")
        assert len(expected_lines) == len(got_lines)
        for want, have in zip(expected_lines, got_lines, strict=True):
            assert want == have or json.loads(want) == json.loads(have)
        assert sum(want != have for want, have in zip(expected_lines, got_lines, strict=True)) == 1
    for messages in PLAIN_CONVERSATIONS[:3]:
        expected = render_chat(tokenizer, messages, add_generation_prompt=True)
        assert ollama_prompt(chat.template, messages, system=chat.system) == expected


def test_it_saves_the_tools_template_where_the_gguf_converter_reads_it(tokenizer, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    own = tokenizer.chat_template
    save_tokenizer(tokenizer, tmp_path)
    assert tokenizer.chat_template == own  # the tokenizer in use is left as it was
    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == chat_template_for(tokenizer)
    assert gguf.SpecialVocab(tmp_path, load_merges=False).chat_template == chat_template_for(tokenizer)


@pytest.mark.model
def test_it_hands_the_converter_the_base_model_with_the_tools_template():
    import gguf
    from transformers import AutoTokenizer

    from tuna_llm.gguf_export import with_chat_template
    from tuna_llm.loading import prepare_embedded_model

    base = prepare_embedded_model(get_base_model_spec())
    expected = chat_template_for(AutoTokenizer.from_pretrained(str(base), local_files_only=True))
    with with_chat_template(base) as source:
        assert source.name == base.name and (source / "model.safetensors").resolve() == (base / "model.safetensors").resolve()
        assert gguf.SpecialVocab(source, load_merges=False).chat_template == expected
    assert not source.exists() and (base / "model.safetensors").is_file()
