"""Every error and warning, each with a small file and its exact line numbers."""

import json

import pytest

from datasets_app.validation import JsonlValidator
from tests.support import pc_rows
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.tokencount import token_counter_for


@pytest.fixture(scope="module")
def counter():
    return token_counter_for(get_base_model_spec())


def lines(rows):
    out = []
    for row in rows:
        out.append(row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode())
    return out


def validate(rows, counter, **kwargs):
    """The report of the validator the upload service runs, fed the rows as file lines."""
    validator = JsonlValidator(counter, **kwargs)
    validator.feed(lines(rows))
    return validator.report()


def errors_by_line(report):
    return {e["line"]: e["message"] for e in report["errors"]["items"]}


def warnings_of(report, kind):
    group = next((w for w in report["warnings"] if w["kind"] == kind), None)
    return {i["line"]: i["message"] for i in group["items"]} if group else {}


def test_it_accepts_a_clean_file_with_statistics(counter):
    report = validate(pc_rows(12), counter)
    assert report["errors"]["count"] == 0
    assert report["warnings"] == []
    assert report["valid_examples"] == 12 and report["format"] == "prompt_completion"
    stats = report["stats"]
    assert stats["examples"] == 12
    assert stats["prompt_tokens"]["min"] <= stats["prompt_tokens"]["p50"] <= stats["prompt_tokens"]["p95"] <= stats["prompt_tokens"]["max"]
    assert sum(stats["histogram"]["prompt"]) == 12 and sum(stats["histogram"]["completion"]) == 12
    assert stats["total_tokens"] > stats["prompt_tokens"]["mean"] * 12  # template and answers counted too
    assert report["recommendations"] == [
        "You have 12 examples. Fine-tunes usually need at least 50-100 good examples to change behaviour reliably; add more if you can."
    ]
    assert any("looks clean" in tip for tip in validate(pc_rows(60), counter)["recommendations"])


def test_it_reports_structural_errors_with_line_numbers(counter):
    rows = pc_rows(14)
    rows[1] = "[1, 2, 3]"
    rows[2] = b'{"prompt": "caf\xff", "completion": "x"}'
    rows[3] = {"question": "What?", "answer": "That."}
    rows[6] = '{"prompt": "broken", "completion": '
    report = validate(rows, counter)
    errors = errors_by_line(report)
    assert "not a JSON object" in errors[2] and "a list" in errors[2]
    assert "not UTF-8" in errors[3]
    assert "unknown format" in errors[4] and '"question"' in errors[4]
    assert "not valid JSON" in errors[7]
    assert set(errors) == {2, 3, 4, 7}
    assert report["errors"]["count"] == 4
    assert report["valid_examples"] == 10


def test_it_reports_field_errors(counter):
    rows = pc_rows(14)
    rows[0] = {"prompt": "Only a prompt here"}
    rows[1] = {"prompt": 5, "completion": "five"}
    rows[2] = {"prompt": "   ", "completion": "blank prompt"}
    rows[3] = {"instruction": "Switch formats", "output": "mixed"}
    report = validate(rows, counter)
    errors = errors_by_line(report)
    assert 'missing the field "completion"' in errors[1]
    assert 'field "prompt" must be a string, got a number' in errors[2]
    assert 'field "prompt" is empty' in errors[3]
    assert "Alpaca format" in errors[4] and "prompt / completion format on line 1" in errors[4]


def test_it_reports_chat_message_errors(counter):
    good = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello to the team"},
            {"role": "assistant", "content": "Hello, team! Nice to see you."},
        ]
    }
    rows = [good] * 0 + [
        {
            "messages": [
                {"role": "user", "content": f"Say hello to person {i}"},
                {"role": "assistant", "content": f"Hello, person number {i}!"},
            ]
        }
        for i in range(16)
    ]
    rows.insert(0, good)
    rows[2] = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows[3] = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    rows[4] = {"messages": [{"role": "user", "content": "Is there an answer?"}]}
    rows[5] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    rows[6] = {"messages": "not a list"}
    report = validate(rows, counter)
    errors = errors_by_line(report)
    assert "role 'bot'" in errors[3]
    assert "has no assistant message" in errors[5]
    assert "empty content" in errors[6]
    assert "must be a list" in errors[7]
    assert report["format"] == "messages"
    assert set(errors) == {3, 5, 6, 7}  # two user messages in a row are fine, as OpenAI takes them


def test_it_accepts_alpaca_with_and_without_input(counter):
    rows = [
        {
            "instruction": f"Translate sentence number {i} to French please",
            "input": "Good morning" if i % 2 else "",
            "output": f"Bonjour, phrase numéro {i}.",
        }
        for i in range(10)
    ]
    report = validate(rows, counter)
    assert report["errors"]["count"] == 0 and report["format"] == "alpaca"


def test_it_needs_at_least_ten_examples(counter):
    report = validate(pc_rows(9), counter)
    assert report["errors"]["count"] == 1
    assert report["errors"]["items"][0]["line"] is None
    assert "9 valid examples; at least 10" in report["errors"]["items"][0]["message"]


def test_it_warns_about_duplicates_naming_the_earlier_line(counter):
    rows = pc_rows(12)
    rows[5] = {"prompt": "  " + rows[1]["prompt"].upper() + " ", "completion": rows[1]["completion"].lower()}
    report = validate(rows, counter)
    assert warnings_of(report, "duplicate") == {6: "duplicates line 2"}
    assert report["errors"]["count"] == 0
    assert any("duplicate" in tip for tip in report["recommendations"])


def test_it_warns_about_short_and_long_texts(counter):
    rows = pc_rows(12)
    rows[2] = {"prompt": "Hi", "completion": rows[2]["completion"]}
    rows[3] = {"prompt": rows[3]["prompt"], "completion": "Yes."}
    rows[4] = {"prompt": "word " * 2100, "completion": rows[4]["completion"]}
    rows[5] = {"prompt": rows[5]["prompt"], "completion": "word " * 2100}
    report = validate(rows, counter)
    assert set(warnings_of(report, "short_prompt")) == {3}
    assert set(warnings_of(report, "short_completion")) == {4}
    assert set(warnings_of(report, "long_prompt")) == {5}
    assert set(warnings_of(report, "long_completion")) == {6}
    truncated = warnings_of(report, "truncated")
    assert set(truncated) == {5, 6} and "cut to 512" in truncated[5]
    assert report["stats"]["truncated"] == 2
    assert any("2 examples will be cut at max_seq_length 512" in tip for tip in report["recommendations"])
    assert set(warnings_of(report, "unbalanced")) == {5, 6}


def test_it_warns_about_answers_without_letters(counter):
    rows = pc_rows(12)
    rows[8] = {"prompt": rows[8]["prompt"], "completion": "12345 678 --- 99"}
    report = validate(rows, counter)
    assert set(warnings_of(report, "no_letters")) == {9}


def test_it_counts_every_message_but_lists_only_the_first_hundred(counter):
    rows = ["not json"] * 150 + pc_rows(10)
    report = validate(rows, counter)
    assert report["errors"]["count"] == 150
    assert len(report["errors"]["items"]) == 100
    assert report["errors"]["more"] == 50
    assert report["errors"]["items"][-1]["line"] == 100


def test_it_skips_blank_lines_but_keeps_line_numbers(counter):
    rows = pc_rows(11)
    rows.insert(3, "")
    rows.insert(8, "{oops")
    report = validate(rows, counter)
    assert errors_by_line(report) == {9: "is not valid JSON: Expecting property name enclosed in double quotes (column 2)"}
    assert report["blank_lines"] == 1
