"""llama.cpp keeps at most TUNA_ADAPTER_CACHE_SIZE LoRA adapters loaded: the least recently used is freed when
another is loaded, and a freed one is loaded again (with the same answers) when it is asked for. Real pinned
llama.cpp, the embedded model's GGUF and LoRA GGUFs converted by the pinned converter."""

from __future__ import annotations

import importlib.util
import resource
from pathlib import Path

import pytest

from inference_app.engines import BASE_GGUF
from tuna_llm import gguf_export
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import prepare_embedded_model
from tuna_llm.serving.llamacpp import LlamaCall, LlamaCppModel

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"),
]

ADAPTERS = 4
RANK = 32  # every linear layer: about 20 MB of f16 weights per adapter, so keeping them all would show in memory
PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return Path(prepare_embedded_model(get_base_model_spec()))


@pytest.fixture(scope="module")
def base_gguf(base_dir, shared_gguf_dir) -> Path:
    """The embedded model's f16 GGUF where the exports keep it (converted once per test session)."""
    path = shared_gguf_dir / get_base_model_spec().name / BASE_GGUF
    if not path.is_file():
        gguf_export.convert_model(base_dir, path, "f16")
    return path


@pytest.fixture(scope="module")
def lora_ggufs(base_dir, tmp_path_factory) -> list[Path]:
    """Distinct LoRA GGUFs (random, non-zero weights: each one changes the answer in its own way)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("loras")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init_lora_weights=False),
    )
    out = []
    for index in range(ADAPTERS):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
        adapter = folder / f"adapter-{index}"
        model.save_pretrained(str(adapter))
        out.append(gguf_export.convert_lora(adapter, base_dir, folder / f"lora-{index}.gguf"))
    return out


def rss_mb() -> float:
    """This process's resident memory now (from /proc: ru_maxrss is only its peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def answer(model: LlamaCppModel, lora: Path | None, max_tokens: int = 8) -> str:
    return model.chat(LlamaCall(messages=list(PROMPT), max_tokens=max_tokens, lora=lora)).text


def test_it_keeps_at_most_the_cache_size_of_loras_loaded_least_recently_used_first(settings, base_gguf, lora_ggufs):
    settings.TUNA_ADAPTER_CACHE_SIZE = 2
    model = LlamaCppModel(base_gguf, n_ctx=256)
    first, second, third, fourth = lora_ggufs

    base = answer(model, None)
    answers = {path: answer(model, path) for path in (first, second)}
    assert model.loaded_adapters == [first, second]
    assert len({base, answers[first], answers[second]}) == 3  # each adapter is applied (random weights answer differently)

    answers[third] = answer(model, third)
    assert model.loaded_adapters == [second, third]  # the least recently used (first) was freed

    assert answer(model, first) == answers[first]  # loaded again: the very same answer
    assert model.loaded_adapters == [third, first]

    assert answer(model, third) == answers[third]  # used: now the most recent
    answers[fourth] = answer(model, fourth)
    assert model.loaded_adapters == [third, fourth]  # first (least recent) went, not third

    assert answer(model, None) == base  # the base alone: adapters stay loaded for the next call
    assert model.loaded_adapters == [third, fourth]
    assert answer(model, fourth) == answers[fourth]


def test_it_frees_the_memory_of_the_loras_it_drops(settings, base_gguf, lora_ggufs):
    settings.TUNA_ADAPTER_CACHE_SIZE = 1
    model = LlamaCppModel(base_gguf, n_ctx=256)
    size_mb = lora_ggufs[0].stat().st_size / 2**20
    for path in lora_ggufs:  # a first round: each adapter once, and what decoding with one allocates once
        answer(model, path, max_tokens=1)
    before = rss_mb()

    for _ in range(2):  # 8 more loads, each freeing the one before
        for path in lora_ggufs:
            answer(model, path, max_tokens=1)
    grown = rss_mb() - before

    assert model.loaded_adapters == [lora_ggufs[-1]]
    # Not freed, 8 loads would hold 8 more adapters (about 8 x size_mb); freed, memory stays where it was.
    assert grown < size_mb, f"resident memory grew {grown:.0f} MB over 8 loads of {size_mb:.0f} MB adapters"


ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['content'] }}{% endfor %}"
)


def test_it_refuses_messages_a_gguf_s_chat_template_refuses_naming_its_rule(base_gguf):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tuna_llm.prompting import ChatTemplateRefused

    model = LlamaCppModel(base_gguf, n_ctx=256)
    model.formatter = Jinja2ChatFormatter(template=ALTERNATING, eos_token="</s>", bos_token="<s>")  # a Mistral-style rule

    assert model.prompt_tokens([{"role": "user", "content": "Hi"}])
    with pytest.raises(ChatTemplateRefused) as refused:
        model.prompt_tokens([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}])
    assert refused.value.rule == "Conversation roles must alternate user/assistant/user/assistant/..."
