"""bench/device_check.py, the GPU proof prepared for a lent device: its whole path runs on a CPU with --tiny
(a small model of Llama's architecture with random weights, trained and served through the product's own code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.py"


def run_check(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["TMPDIR"] = str(scratch)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.process
def test_it_refuses_the_full_check_without_its_prepared_tokenizer(tmp_path):
    done = run_check(tmp_path, "--tokenizer", str(tmp_path / "absent"), timeout=60)

    assert done.returncode == 1
    assert f"No tokenizer at {tmp_path / 'absent'}: run `bench/device_check.py --prepare`" in done.stderr
    assert done.stdout == ""


@pytest.mark.process
def test_it_trains_and_serves_a_tiny_model_through_the_product_code_on_a_cpu(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    report_file = tmp_path / "report.json"

    done = run_check(tmp_path, "--tiny", "--skip-embedded", "--tokenizer", str(tokenizer), "--out", str(report_file))

    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)  # stdout is the JSON alone (the Trainer's logs go to stderr)
    assert json.loads(report_file.read_text(encoding="utf-8")) == report
    assert (tokenizer / "tokenizer.json").is_file() and (tokenizer / "chat_template.jinja").is_file()
    assert report["tiny"] is True and report["synthetic_model"]["shape"] == "tiny"
    training = report["training"]
    assert training["steps"] == 3 and training["steps_timed"] == 2
    assert training["plan"].startswith("bf16 on CPU")
    assert training["tokens_per_second"] > 0 and training["adapter_bytes"] > 0
    generation = report["generation"]
    assert generation["engine"] == {"name": "transformers", "precision": "bf16", "device": "cpu"}
    assert generation["one_stream"]["requests"] == 1 and generation["one_stream"]["completion_tokens"] > 0
    assert generation["8_concurrent"]["requests"] == 8 and generation["8_concurrent"]["completion_tokens"] > 0
    assert report["embedded_job"] == {"skipped": "--skip-embedded"}
    # The model, the checkpoints and the adapter went with the run (torch may leave its own compile cache there).
    assert [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")] == []
