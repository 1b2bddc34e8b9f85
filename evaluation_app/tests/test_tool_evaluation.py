"""Evaluating tool-calling and preference fine-tunes: answers scored on their calls, examples generated with their
tools, and a DPO job from a preference file evaluated against its start when it completes."""

import json

import pytest
from django.utils import timezone

from datasets_app.examples import held_out_examples
from datasets_app.services import dataset_create
from evaluation_app.models import Evaluation, EvaluationExample
from tests.support import job_row, jsonl_file
from training_app.models import TrainingJob
from training_app.services import job_completed, preference_file_job_start
from tuna_core.jobs import run_next_job
from tuna_llm import metrics
from tuna_llm.prompting import Conversation, answer_text, render_chat
from tuna_llm.toolcalls import calls_match, parse_tool_calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
CITIES = ["Paris", "Lyon", "Oslo", "Rome", "Lima", "Kyiv", "Quito", "Hanoi", "Dakar", "Perth", "Turin", "Bergen"]


def call_message(name: str, arguments: dict, content: str = "") -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def tagged(name: str, arguments: dict) -> str:
    """An answer written in the tools template's convention (Hermes/Qwen <tool_call>)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# -- scoring (no model) ---------------------------------------------------------------------------
def test_it_scores_a_tool_call_answer_on_its_calls_whatever_the_key_order():
    reference = call_message("get_weather", {"city": "Paris", "unit": "celsius"})
    scores = metrics.answer_quality(tagged("get_weather", {"unit": "celsius", "city": "Paris"}), reference)
    assert scores["exact_match"] == scores["tool_calls"] == 1.0
    assert scores["rouge_l"] == pytest.approx(1.0) and scores["bleu"] == pytest.approx(1.0)
    # The canonical form of the calls ignores key order and call order.
    two = [{"name": "a", "arguments": {"x": 1, "y": 2}}, {"name": "b", "arguments": {}}]
    assert metrics.calls_text("", two) == metrics.calls_text("", [two[1], {"name": "a", "arguments": {"y": 2, "x": 1}}])


@pytest.mark.parametrize(
    "answer",
    [
        tagged("get_forecast", {"city": "Paris", "unit": "celsius"}),  # another function
        tagged("get_weather", {"city": "Lyon", "unit": "celsius"}),  # another value
        tagged("get_weather", {"city": "Paris"}),  # an argument missing
        "The weather in Paris is sunny.",  # no call at all
    ],
)
def test_it_does_not_count_a_wrong_call_as_exact(answer):
    reference = call_message("get_weather", {"city": "Paris", "unit": "celsius"})
    scores = metrics.answer_quality(answer, reference)
    assert scores["exact_match"] == scores["tool_calls"] == 0.0
    assert 0 <= scores["rouge_l"] < 1 and 0 <= scores["bleu"] < 1


def test_it_scores_text_answers_as_before():
    reference = {"role": "assistant", "content": "Order 3 contains three items."}
    for answer in ("Order 3 contains three items.", "Order 3 has two items.", tagged("get_weather", {"city": "Paris"})):
        assert metrics.answer_quality(answer, reference) == metrics.quality(answer, "Order 3 contains three items.")
    run = metrics.ModelRun([metrics.quality("a", "a")], [1.0], [1], None)
    assert "tool_call_match" not in metrics.summarise(run, hourly_usd=1.0)  # only when some reference calls tools
    mixed = metrics.ModelRun(
        [metrics.quality("a", "a"), {"exact_match": 0.0, "rouge_l": 0.5, "bleu": 0.1, "tool_calls": 0.0}], [1.0, 1.0], [1, 1], None
    )
    assert metrics.summarise(mixed, hourly_usd=1.0)["tool_call_match"] == 0.0


# -- a held-out set with tools (the real embedded model, tiny settings) ----------------------------
def tool_rows() -> list[dict]:
    """Twelve examples with tools; the last two are held out: one whose answer is a call, one whose answer is text
    after a tool result."""
    rows = []
    for i, city in enumerate(CITIES):
        messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
        call = call_message("get_weather", {"city": city})  # a short call: the decoding budget follows the reference
        if i == len(CITIES) - 1:
            messages += [call, {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 12}'}]
            messages.append({"role": "assistant", "content": f"It is 12 degrees in {city}."})
        else:
            messages.append(call)
        rows.append({"messages": messages, "tools": [WEATHER], "parallel_tool_calls": False})
    return rows


@pytest.mark.django_db
@pytest.mark.model
def test_it_evaluates_held_out_examples_with_their_tools_and_scores_the_calls(alice, alice_client, trained_adapter):
    from tuna_llm.serving.registry import registry

    dataset = dataset_create(owner=alice, upload=jsonl_file(tool_rows()), name="Weather tools")
    assert dataset.is_valid and dataset.num_eval == 2, dataset.validation_report
    job = job_row(alice, dataset, status="completed", adapter_dir=str(trained_adapter), completed_at=timezone.now())
    from evaluation_app.services import evaluation_start

    evaluation, _ = evaluation_start(owner=alice, job=job, test_size=2)
    run_next_job()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    called, texted = EvaluationExample.objects.filter(evaluation=evaluation).order_by("index")
    held_out = held_out_examples(dataset)
    tokenizer = registry.get(job.base_model).tokenizer
    for example, conversation in zip((called, texted), held_out, strict=True):
        # What the models saw is stored: the messages and the tools, rendered together into the prompt.
        assert example.tools == [WEATHER] and example.messages == list(conversation[:-1])
        prompt = render_chat(tokenizer, Conversation(example.messages, tools=example.tools), add_generation_prompt=True)
        assert "get_weather" in prompt
        assert (
            example.base_prompt_tokens == example.finetuned_prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        )
        assert example.reference == answer_text(conversation[-1])
    # The answer whose reference calls a tool is scored on the calls ...
    assert called.reference_calls == [{"name": "get_weather", "arguments": {"city": "Turin"}}]
    for output, scores in ((called.base_output, called.base_scores), (called.finetuned_output, called.finetuned_scores)):
        assert scores["exact_match"] == scores["tool_calls"] == float(calls_match(called.reference_calls, parse_tool_calls(output)[1]))
    # ... the one whose reference is text, on its text.
    assert texted.reference_calls == [] and texted.reference == "It is 12 degrees in Bergen."
    assert set(texted.base_scores) == {"exact_match", "rouge_l", "bleu"}
    assert texted.base_scores == metrics.quality(texted.base_output, texted.reference)
    for side, scores in (("base_model", called.base_scores), ("finetuned_model", called.finetuned_scores)):
        assert evaluation.metrics[side]["tool_call_match"] == scores["tool_calls"]
    page = alice_client.get(f"{evaluation.get_absolute_url()}?blind=0").content.decode()
    assert '<code class="tool-name">get_weather</code>' in page and "&quot;city&quot;: &quot;Turin&quot;" in page


@pytest.mark.django_db
def test_it_shows_calls_readably_and_escaped_on_the_comparison_page(alice_client, evaluation):
    example = evaluation.examples.get(index=0)
    example.tools = [WEATHER]
    example.reference = tagged("get_weather", {"city": "<b>Paris</b>"})
    example.reference_calls = [{"name": "get_weather", "arguments": {"city": "<b>Paris</b>"}}]
    example.finetuned_output = tagged("get_weather", {"city": "<b>Paris</b>"})
    example.base_output = "I cannot check the weather <i>now</i>."
    example.save()
    page = alice_client.get(f"{evaluation.get_absolute_url()}?blind=0").content.decode()
    article = page[page.index('id="compare-0"') : page.index('id="compare-1"')]
    pretty = json.dumps({"city": "<b>Paris</b>"}, indent=2).replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    assert article.count(f'<pre class="tool-arguments">{pretty}</pre>') == 2  # the reference's call and the matching answer's
    assert "<b>Paris" not in article and "<i>now" not in article
    assert "✓ same calls" in article and "✗ different calls" in article and "No tool call." in article
    # The voting panel shows the calls the same way, the names still hidden.
    page = alice_client.get(evaluation.get_absolute_url(), {"example": 0}).content.decode()
    panel = page[page.index('id="example-view"') :].split("vote-form")[0]
    assert "Tools offered: <code>get_weather</code>" in panel and panel.count(f'<pre class="tool-arguments">{pretty}</pre>') == 2
    assert "&lt;i&gt;now&lt;/i&gt;" in panel and "<b>Paris" not in panel and "Fine-tuned" not in panel


# -- a DPO job from a preference file ---------------------------------------------------------------
def preference_rows(count: int = 10) -> list[dict]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Summarise order number {i}: two blue shirts."}]},
            "preferred_output": [{"role": "assistant", "content": f"Order {i}: two blue shirts."}],
            "non_preferred_output": [{"role": "assistant", "content": f"I do not know order {i}."}],
        }
        for i in range(count)
    ]


@pytest.mark.django_db
@pytest.mark.model
def test_it_evaluates_a_completed_file_dpo_job_against_its_start(alice, alice_client, finetuned_job, trained_adapter):
    dataset = dataset_create(owner=alice, upload=jsonl_file(preference_rows()), name="Preferences")
    assert dataset.is_preference and dataset.num_eval == 2, dataset.validation_report

    def trained(job: TrainingJob) -> TrainingJob:  # as if the worker had trained it (the session's adapter stands in)
        TrainingJob.objects.filter(pk=job.pk).update(status="completed", adapter_dir=str(trained_adapter), completed_at=timezone.now())
        job.refresh_from_db()
        return job

    from_base = trained(preference_file_job_start(owner=alice, dataset=dataset, config_data={}))
    from_parent = trained(preference_file_job_start(owner=alice, dataset=dataset, parent=finetuned_job, config_data={}))
    assert from_base.parent is None and from_parent.parent == finetuned_job and from_base.source_evaluation is None
    supervised = job_row(alice, dataset, status="completed", adapter_dir=str(trained_adapter))
    for job in (from_base, from_parent, supervised):
        job_completed.send(sender=TrainingJob, job=job)
    # Each DPO job is queued against its start: the base model, or the fine-tune it was tuned from.
    assert not Evaluation.objects.filter(training_job=supervised).exists()
    against_base = Evaluation.objects.get(training_job=from_base)
    assert against_base.status == "queued" and against_base.baseline_job is None and against_base.test_size == 2
    assert Evaluation.objects.get(training_job=from_parent).baseline_job == finetuned_job
    Evaluation.objects.filter(training_job=from_parent).delete()
    run_next_job()
    against_base.refresh_from_db()
    assert against_base.status == "completed", against_base.error_message
    # The held-out pairs give their preferred answer as the reference.
    assert [e.reference for e in against_base.examples.all()] == ["Order 8: two blue shirts.", "Order 9: two blue shirts."]
    page = alice_client.get(against_base.get_absolute_url()).content.decode()
    assert f"preference-tuned job #{from_base.pk} vs the base model" in page
    assert f"preference-tuned from the base model on {len(from_base.preference_pairs)} pairs of the preference file" in page
    assert ">Preferences</a>" in page
