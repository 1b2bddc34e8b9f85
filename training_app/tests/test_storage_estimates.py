"""What a run or an export will write, estimated from the base model's files (tuna_llm.sizes) and checked against the
user's quota (TUNA_MAX_STORAGE_MB_PER_USER) before it starts; the estimates measured against real files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from django.utils import timezone

from tests.support import job_row
from training_app import exports, services
from training_app.models import Experiment, Export, TrainingJob
from tuna_llm import sizes
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.training import COMPLETE_MARKER
from tuna_llm.training_config import TrainingConfig

pytestmark = pytest.mark.django_db

TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "save_steps": 2, "eval_steps": 2, "eval_examples": 2}
SWEEP = {"config": TINY, "grid": [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}]}
NEEDS = re.compile(r"needs about ([\d.]+) MB")


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names)


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def jobs_to_go_on_from(alice, dataset, data_dir) -> tuple[TrainingJob, TrainingJob]:
    """A completed job (to continue and export) and a failed one with a whole checkpoint (to resume)."""
    config = TrainingConfig(base_model="smollm2-135m-instruct", **TINY).to_dict()
    completed = job_row(alice, dataset, status="completed", config=config, completed_at=timezone.now())
    write(data_dir / "jobs" / str(completed.pk) / "adapter" / "adapter_model.safetensors", 1000)
    completed.adapter_dir = str(data_dir / "jobs" / str(completed.pk) / "adapter")
    completed.save()
    failed = job_row(alice, dataset, status="failed", config=config, completed_at=timezone.now())
    checkpoint = data_dir / "jobs" / str(failed.pk) / "checkpoints" / "checkpoint-2"
    write(checkpoint / "optimizer.pt", 1000)
    write(checkpoint / COMPLETE_MARKER, 0)
    return completed, failed


def requests(api, dataset, completed, failed) -> dict:
    return {
        "start": api.post("/api/training/start", {"dataset_id": dataset.pk, "config": TINY}, format="json"),
        "continue": api.post(f"/api/training/{completed.pk}/continue", {"epochs": 1}, format="json"),
        "resume": api.post(f"/api/training/{failed.pk}/resume", {}, format="json"),
        "sweep": api.post("/api/experiments", {"dataset_id": dataset.pk, **SWEEP}, format="json"),
        "export": api.post(f"/api/training/{completed.pk}/export", {"formats": ["merged_safetensors"]}, format="json"),
    }


def rows() -> tuple[int, int, int]:
    return TrainingJob.objects.count(), Export.objects.count(), Experiment.objects.count()


# -- the quota ------------------------------------------------------------------------------------
def test_it_refuses_a_run_sweep_or_export_whose_estimate_passes_the_quota(alice, alice_api, valid_dataset, data_dir, settings):
    completed, failed = jobs_to_go_on_from(alice, valid_dataset, data_dir)
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 5  # far from full (a few KB used), but below what any of them writes
    before, counts = files_under(data_dir), rows()

    answers = requests(alice_api, valid_dataset, completed, failed)
    needs = {}
    for action, response in answers.items():
        assert response.status_code == 409, (action, response.content)
        detail = response.json()["detail"]
        assert "storage quota (TUNA_MAX_STORAGE_MB_PER_USER)" in detail and "(an estimate of the files it writes)" in detail, detail
        needs[action] = float(NEEDS.search(detail).group(1))
    # A run: its LoRA adapter (fp32) and 3 copies of it per kept checkpoint, from the base's config.json.
    config = TrainingConfig.from_dict(completed.config)
    assert needs["resume"] == round(services.run_storage_estimate(config) / 1024 / 1024, 1)
    assert abs(needs["sweep"] - 2 * needs["start"]) < 0.5  # a sweep: the sum of its runs
    # An export of merged weights: about the base's safetensors.
    weights = sizes.weight_bytes(get_base_model_spec("smollm2-135m-instruct").config_dir())
    assert needs["export"] == round(weights / 1024 / 1024, 1)
    assert rows() == counts and files_under(data_dir) == before
    failed.refresh_from_db()
    assert failed.status == "failed" and failed.resume_count == 0


def test_it_charges_an_export_what_its_folder_keeps_and_counts_the_shared_gguf_for_the_disk_only(
    alice, valid_dataset, data_dir, settings, tmp_path
):
    settings.TUNA_GGUF_DIR = tmp_path / "gguf"  # no base converted yet
    job = job_row(alice, valid_dataset, status="completed", completed_at=timezone.now())
    write(data_dir / "jobs" / str(job.pk) / "adapter" / "adapter_model.safetensors", 20_000_000)
    job.adapter_dir = str(data_dir / "jobs" / str(job.pk) / "adapter")
    base = get_base_model_spec("smollm2-135m-instruct").config_dir()
    weights, parameters = sizes.weight_bytes(base), sizes.estimate_parameters(sizes.read_config(base))
    kept, elsewhere = exports.export_storage_estimate(job, exports.ALL_FORMATS)
    # The job's folder: merged weights, the adapter as an f16 LoRA GGUF (half its fp32 size), the merged q8_0 GGUF,
    # and the merged Q5_K_M and Q4_K_M GGUFs.
    assert kept == int(weights + 10_000_000 + parameters * 1.07 + (parameters * 0.85 + parameters * 0.8))
    # Elsewhere, written once per base: its f16 and q8_0 GGUFs, not charged to the user; and while the export runs,
    # the merged f16 GGUF llama-quantize reads (removed once quantized).
    assert elsewhere == int(parameters * 2.0 + parameters * 1.07 + parameters * 2.0)
    for outtype in ("f16", "q8_0"):
        write(exports.base_gguf_dir(job.base_model) / f"base-{outtype}.gguf", 10)
    assert exports.export_storage_estimate(job, exports.ALL_FORMATS) == (kept, int(parameters * 2.0))


def test_it_falls_back_to_the_full_quota_check_for_a_base_whose_files_are_not_here(alice, alice_api, valid_dataset, data_dir, settings):
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "hubby": "example-org/hubby-1b"}  # never downloaded here
    hub = job_row(alice, valid_dataset, base_model="hubby", status="completed", completed_at=timezone.now())
    write(data_dir / "jobs" / str(hub.pk) / "adapter" / "adapter_model.safetensors", 1000)
    hub.adapter_dir = str(data_dir / "jobs" / str(hub.pk) / "adapter")
    hub.save()
    assert exports.export_storage_estimate(hub, ["merged_safetensors"]) is None
    settings.TUNA_MAX_STORAGE_MB_PER_USER = 5
    answer = alice_api.post(f"/api/training/{hub.pk}/export", {"formats": ["merged_safetensors"]}, format="json")
    assert answer.status_code == 202, answer.content  # nothing to estimate from: only a full quota refuses
    Export.objects.all().delete()
    settings.TUNA_MAX_STORAGE_MB_PER_USER = (valid_dataset.size_bytes + 1000) / 1024 / 1024  # exactly full
    answer = alice_api.post(f"/api/training/{hub.pk}/export", {"formats": ["merged_safetensors"]}, format="json")
    assert answer.status_code == 409 and "an export writes more" in answer.json()["detail"]


# -- the estimates against real files ---------------------------------------------------------------
def tree_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


@pytest.mark.model
def test_it_estimates_a_runs_files_within_twice_their_real_size(trained_adapter):
    """The session's tiny fine-tune (r=8 on q_proj and v_proj): its adapter folder and its checkpoint, measured."""
    spec = get_base_model_spec()
    config = TrainingConfig(base_model=spec.name)
    adapter = Path(trained_adapter)
    shape = json.loads((adapter / "adapter_config.json").read_text())
    r, modules = shape["r"], shape["target_modules"]
    checkpoints = sorted((adapter.parent / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the tiny run saved no checkpoint"
    one_checkpoint = tree_bytes(checkpoints[-1])
    real = tree_bytes(adapter) + config.save_total_limit * one_checkpoint  # what a run keeping its bound of checkpoints holds
    estimate = sizes.run_estimate(spec.config_dir(), r=r, target_modules=modules, kept_checkpoints=config.save_total_limit)
    print(f"adapter folder {tree_bytes(adapter)} B, one checkpoint {one_checkpoint} B; run: estimate {estimate} B, real {real} B")
    assert real / 2 <= estimate <= real * 2
    per_checkpoint = sizes.lora_parameters(sizes.read_config(spec.config_dir()), r=r, target_modules=modules) * 4 * 3
    assert one_checkpoint / 2 <= per_checkpoint <= one_checkpoint * 2
