"""The base-model catalog and registry, on the real embedded model."""

import pytest
from django.core.management import call_command

from training_app.models import ThroughputMeasurement
from tuna_llm.catalog import get_base_model_spec, get_catalog
from tuna_llm.prompting import render_chat
from tuna_llm.serving.batching import generate_chat
from tuna_llm.serving.registry import registry
from tuna_llm.tokencount import token_counter_for


def test_it_lists_the_embedded_model_ready(capsys):
    call_command("tuna_models")
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct"))
    assert "ready" in line and "(default)" in line


def test_it_classifies_catalog_sources(settings, tmp_path):
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "llama": "meta-llama/Llama-3.1-8B-Instruct", "mine": str(tmp_path)}
    catalog = get_catalog()
    assert catalog["smollm2-135m-instruct"].kind == "embedded"
    assert catalog["llama"].kind == "hub" and catalog["llama"].state() == "remote"
    assert catalog["mine"].kind == "local" and catalog["mine"].state() == "missing"


@pytest.mark.model
def test_it_answers_a_chat_prompt_sensibly_on_cpu():
    loaded = registry.get()
    assert loaded is registry.get()  # loaded once per process
    assert loaded.device in ("cpu", "cuda")
    answer = generate_chat(loaded, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=30)
    assert "Paris" in answer.text
    assert answer.prompt_tokens > 5 and 0 < answer.completion_tokens <= 30
    assert answer.finish_reason == "stop"


@pytest.mark.model
def test_it_counts_tokens_like_the_real_tokenizer_and_template():
    loaded = registry.get()
    counter = token_counter_for(get_base_model_spec())
    messages = [{"role": "user", "content": "Two large red hoodies, please."}, {"role": "assistant", "content": '{"product": "hoodie"}'}]
    real = len(
        loaded.tokenizer(render_chat(loaded.tokenizer, messages, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    )
    estimated = sum(counter.count_many([m["content"] for m in messages])) + counter.template_overhead(("user", "assistant"))
    assert abs(real - estimated) <= 2


@pytest.mark.django_db
@pytest.mark.model
def test_it_measures_training_speed_once_when_asked_if_missing(capsys):
    call_command("tuna_models", "--calibrate-if-missing")
    first = ThroughputMeasurement.objects.get()
    assert first.base_model == "smollm2-135m-instruct" and first.tokens_per_second > 0
    assert first.source.startswith("calibration, 8 steps")
    assert "Measuring training speed" in capsys.readouterr().out
    call_command("tuna_models", "--calibrate-if-missing")  # make run again: nothing changes
    assert ThroughputMeasurement.objects.count() == 1
    assert "Measuring" not in capsys.readouterr().out
