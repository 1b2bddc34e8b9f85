"""An export that needs a llama.cpp program this server lacks is refused before it is queued, naming the program and
how to install it (the environment's bin/ is where `make install` puts llama-quantize)."""

from __future__ import annotations

import sys

import pytest

from tests.support import job_row
from training_app.models import Export
from tuna_llm import gguf_export

pytestmark = pytest.mark.django_db


def test_it_refuses_a_k_quant_export_without_llama_quantize_and_queues_nothing(alice, alice_api, valid_dataset, tmp_path, monkeypatch):
    job = job_row(alice, valid_dataset, status="completed", adapter_dir=str(tmp_path / "adapter"))
    monkeypatch.setenv(gguf_export.CONVERTER_DIR_ENV, str(gguf_export.converter_dir()))  # the converter stays found
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "bare-prefix"))  # an environment without llama.cpp's programs
    for formats in (["gguf_q4_k_m"], ["merged_safetensors", "gguf_q5_k_m"]):
        answer = alice_api.post(f"/api/training/{job.pk}/export", {"formats": formats}, format="json")
        assert answer.status_code == 503, answer.content
        assert "llama-quantize is not installed" in answer.json()["detail"] and "make install" in answer.json()["detail"]
    assert not Export.objects.exists()
