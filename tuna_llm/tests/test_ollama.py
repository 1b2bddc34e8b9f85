"""The Ollama export: a TEMPLATE derived from the model's chat template that renders every conversation exactly as
the tokenizer does, the right stop tokens, and a Modelfile that Ollama's format accepts."""

from __future__ import annotations

import re

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tuna_llm.ollama import bundle_readme, derive_chat_template, modelfile, ollama_chat
from tuna_llm.tests.modelfile import ollama_prompt, parse_modelfile

CONVERSATIONS = {
    "no system": [{"role": "user", "content": "Turn 'two pizzas' into JSON."}],
    "with system": [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Two pizzas, one salad"}],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What would you like?"},
        {"role": "user", "content": "A pizza\nand a salad, please."},
    ],
    "multi-turn with system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": '{"n": 2}'},
        {"role": "user", "content": "Three"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import prepare_embedded_model

    return AutoTokenizer.from_pretrained(prepare_embedded_model(get_base_model_spec()), local_files_only=True)


class JinjaTokenizer:
    """Just enough of a Hugging Face tokenizer to try chat templates that no real model here has."""

    eos_token, bos_token = "</s>", "<s>"
    all_special_tokens = ["<s>", "</s>"]

    def __init__(self, template: str) -> None:
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    def apply_chat_template(self, messages, *, tokenize=False, add_generation_prompt=False):
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>")


def test_it_renders_go_templates_like_ollama():
    template = '{{- range .Messages }}\n{{- if eq .Role "user" }}Q: {{ .Content }}\n{{ else }}A: {{ .Content -}}\n\n{{ end }}{{ end }}A:'
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"}]
    assert ollama_prompt(template, messages, system="Be exact.") == "A: Be exact.Q: 1+1\nA: 2Q: 2+2\nA:"


# --- The embedded model


@pytest.mark.model
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_it_renders_every_conversation_as_the_tokenizer_does(tokenizer, name):
    chat = ollama_chat(tokenizer)
    messages = CONVERSATIONS[name]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ollama_prompt(chat.template, messages, system=chat.system) == expected


@pytest.mark.model
def test_it_finds_the_default_system_prompt_and_the_stop_token(tokenizer):
    parts = derive_chat_template(tokenizer)
    assert parts.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert parts.generation_prompt == "<|im_start|>assistant\n"
    assert parts.prefixes["user"] == "<|im_start|>user\n" and parts.suffixes["assistant"] == "<|im_end|>\n"
    chat = ollama_chat(tokenizer)
    assert chat.stops == ("<|im_end|>",)
    assert chat.system == parts.default_system
    assert chat.template.startswith('{{ range .Messages }}{{ if eq .Role "system" }}')
    assert chat.template.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")


@pytest.mark.model
def test_it_writes_a_modelfile_that_parses_with_base_and_adapter(tokenizer):
    chat = ollama_chat(tokenizer)
    text = modelfile(chat, model_file="base-f16.gguf", adapter_file="adapter-f16.gguf")
    parsed = parse_modelfile(text)
    assert parsed.values("from") == ["./base-f16.gguf"]
    assert parsed.values("adapter") == ["./adapter-f16.gguf"]
    assert parsed.value("template") == chat.template
    assert parsed.value("system") == chat.system
    assert parsed.parameters["stop"] == ["<|im_end|>"]
    assert parsed.parameters["temperature"] == ["0"]
    assert 'TEMPLATE """{{ range .Messages }}' in text and 'SYSTEM """You are' in text

    merged = parse_modelfile(modelfile(chat, model_file="merged-f16.gguf", greedy=False, num_ctx=2048))
    assert merged.values("from") == ["./merged-f16.gguf"] and merged.values("adapter") == []
    assert "temperature" not in merged.parameters and merged.parameters["num_ctx"] == ["2048"]


# --- Templates of other shapes


def test_it_derives_a_template_without_a_default_system_prompt():
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = JinjaTokenizer(chatml)
    tokenizer.all_special_tokens = ["<|im_start|>", "<|im_end|>", "</s>"]
    chat = ollama_chat(tokenizer)
    assert chat.system is None and chat.stops == ("<|im_end|>", "</s>")
    for messages in CONVERSATIONS.values():
        assert ollama_prompt(chat.template, messages, system=chat.system) == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True
        )
    assert "SYSTEM" not in modelfile(chat, model_file="m.gguf")


def test_it_keeps_a_start_text_out_of_the_messages():
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer = JinjaTokenizer(template)
    parts = derive_chat_template(tokenizer)
    assert parts.start == "<s>" and parts.prefixes["user"] == "<|user|>" and parts.suffixes["assistant"] == "</s>"
    chat = ollama_chat(tokenizer)
    assert chat.stops == ("</s>",)
    for messages in CONVERSATIONS.values():
        assert ollama_prompt(chat.template, messages, system=chat.system) == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True
        )
    # A tokenizer that adds BOS itself converts to a GGUF that does too, so the template must not repeat it.
    tokenizer.add_bos_token = True
    assert ollama_chat(tokenizer).template.startswith("{{ range .Messages }}")


def test_it_refuses_a_template_that_folds_the_system_prompt_into_the_first_turn():
    llama2 = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}<<SYS>>{{ system }}<</SYS>> {% endif %}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="Could not derive the system suffix"):
        derive_chat_template(JinjaTokenizer(llama2))


def test_it_refuses_a_template_whose_turns_depend_on_their_position():
    # The last message is written differently from the others: no fixed suffix per role.
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if not loop.last %}</{{ m['role'] }}>{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="(not in per-message prefix/suffix form|Could not derive)"):
        derive_chat_template(JinjaTokenizer(template))


def test_it_refuses_a_template_that_rewrites_contents():
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}</s>{% endfor %}"
    with pytest.raises(ValueError, match="Could not find the system message's content"):
        derive_chat_template(JinjaTokenizer(template))


# --- Ollama's Modelfile format


def test_it_parses_the_documented_forms():
    text = (
        "# comment\n"
        "from llama3.2\n"
        "PARAMETER temperature 1\n"
        "parameter num_ctx 4096\n"
        "PARAMETER stop <|eot_id|>\n"
        'PARAMETER stop "AI assistant:"\n'
        "SYSTEM You are Mario from super mario bros, acting as an assistant.\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n'
        "{{ .System }}<|im_end|>\n"
        '{{ end }}"""\n'
        "ADAPTER ./ollama-lora.gguf\n"
        'LICENSE """\n<license text>\n"""\n'
        "MESSAGE user Is Toronto in Canada?\n"
        "MESSAGE assistant yes\n"
    )
    parsed = parse_modelfile(text)
    assert parsed.value("from") == "llama3.2"
    assert parsed.parameters == {"temperature": ["1"], "num_ctx": ["4096"], "stop": ["<|eot_id|>", "AI assistant:"]}
    assert parsed.value("system") == "You are Mario from super mario bros, acting as an assistant."
    assert parsed.value("template") == "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    assert parsed.value("license") == "\n<license text>\n"
    assert [(c.key, c.args) for c in parsed.commands if c.name == "message"] == [("user", "Is Toronto in Canada?"), ("assistant", "yes")]
    assert [c.line for c in parsed.commands][-3:] == [12, 15, 16]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM ./m.gguf\nSTOP <|im_end|>\n", "line 2: unknown instruction 'STOP'"),
        ("FROM ./m.gguf\n\nPARAMETER temprature 0\n", "line 3: unknown PARAMETER 'temprature'"),
        ('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\nSYSTEM hello\n', "line 2: unterminated triple-quoted value for TEMPLATE"),
        ('FROM ./m.gguf\nPARAMETER stop "<|im_end|>\n', "line 2: unterminated quoted value for PARAMETER"),
        ("FROM ./m.gguf\nPARAMETER temperature warm\n", "line 2: PARAMETER temperature takes float"),
        ("FROM ./m.gguf\nMESSAGE tool hi\n", "line 2: MESSAGE role must be one of"),
        ("# no model\nSYSTEM hi\n", "no FROM line"),
    ],
)
def test_it_refuses_what_ollama_would_refuse(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_modelfile(text)


def test_it_refuses_a_value_it_cannot_quote():
    from tuna_llm.ollama import OllamaChat

    with pytest.raises(ValueError, match='cannot contain """'):
        modelfile(OllamaChat(template="{{ .Prompt }}", system='Say """hi"""', stops=()), model_file="m.gguf")


# --- The bundle's README


def test_it_writes_a_readme_for_each_way_to_run_the_bundle():
    readme = bundle_readme(
        name="Orders to JSON",
        base_gguf="base-f16.gguf",
        lora_gguf="adapter-f16.gguf",
        merged_gguf="merged-q8_0.gguf",
        merged_dir="merged",
        parity={
            "f16": {"identical": 12, "total": 12, "exact_match_pytorch": 10, "exact_match_gguf": 10, "tokens_per_second_gguf": 104.25},
            "q8_0": "11/12 identical",
        },
    )
    assert "llama-cli -m base-f16.gguf --lora adapter-f16.gguf" in readme
    assert "llama-server -m merged-q8_0.gguf" in readme
    assert "ollama create orders-to-json -f Modelfile" in readme and "ollama run orders-to-json" in readme
    assert 'AutoModelForCausalLM.from_pretrained("merged")' in readme and "vllm serve ./merged" in readme
    assert "- f16: 12/12 answers identical; exact match 10 (GGUF) vs 10 (PyTorch); 104.2 tokens/s (GGUF) vs ? (PyTorch)" in readme
    assert "- q8_0: 11/12 identical" in readme

    merged_only = bundle_readme(name="m", merged_gguf="merged-f16.gguf", modelfile_name=None)
    assert "--lora" not in merged_only and "ollama" not in merged_only and "Parity" not in merged_only
