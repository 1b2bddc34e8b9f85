"""Shared test fixtures: personas (alice owns things, bob is someone else) and an isolated data dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from tests.support import api_key, job_row, jsonl_file, pc_rows

SAMPLE = Path(__file__).resolve().parent / "samples" / "orders_to_json.jsonl"


def _weights_loaded() -> int:
    loading = sys.modules.get("tuna_llm.loading")
    return loading.weights_loaded if loading is not None else 0


def _check_model_marker(item):
    """A test (or a fixture it asks for) that loads a model's weights must be marked `model`, so that
    `make test-fast` (-m "not model ...") stays free of them."""
    before = _weights_loaded()
    outcome = yield
    if _weights_loaded() > before and item.get_closest_marker("model") is None:
        pytest.fail(f"{item.nodeid} loads the model but is not marked `model` (pytest.mark.model)", pytrace=False)
    return outcome


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_check_model_marker)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_check_model_marker)


@pytest.fixture(scope="session")
def shared_gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path, shared_gguf_dir):
    """Uploads, adapters and checkpoints go to a per-test folder; the converted model cache and the base
    models' GGUF files (converted once per session) are shared."""
    settings.TUNA_DATA_DIR = tmp_path / "data"
    settings.MEDIA_ROOT = settings.TUNA_DATA_DIR
    settings.TUNA_GGUF_DIR = shared_gguf_dir
    settings.TUNA_DATA_DIR.mkdir()
    return settings.TUNA_DATA_DIR


@pytest.fixture(autouse=True)
def rate_limits(settings):
    """Counters never carry from one test to the next, and the API and page rates are generous (a test of a
    rate lowers it with `settings`); the other limits keep their defaults."""
    from django.core.cache import cache

    cache.clear()
    settings.TUNA_API_RATE = "100000/min"
    settings.TUNA_PAGE_RATE = "100000/min"
    yield
    cache.clear()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-pass-123")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-pass-123")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def alice_api(alice):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key(alice)}")
    return api


@pytest.fixture
def bob_api(bob):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {api_key(bob)}")
    return api


@pytest.fixture
def sample_upload():
    return SimpleUploadedFile("orders_to_json.jsonl", SAMPLE.read_bytes())


@pytest.fixture
def valid_dataset(alice):
    from datasets_app.services import dataset_create

    return dataset_create(owner=alice, upload=jsonl_file(pc_rows(20)), name="Orders")


@pytest.fixture
def fp32(settings):
    """The whole model layer in fp32 for one test: batched and alone answers are bit-identical there, so a test
    can assert that batching changes nothing. (In bf16, batching changes the rounding of the matrix products
    and can flip a near-tie: bench/evaluation.py reports how often.)"""
    from tuna_llm.serving.registry import registry

    settings.TUNA_PRECISION = "fp32"
    registry.clear()
    yield
    registry.clear()


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory):
    """A LoRA adapter trained once per session on the sample data (tiny settings, real model)."""

    from datasets_app.examples import file_examples
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import pick_device
    from tuna_llm.training import run_lora_training
    from tuna_llm.training_config import TrainingConfig

    spec = get_base_model_spec()
    examples = file_examples(SAMPLE)[:40]
    config = TrainingConfig(
        base_model=spec.name, max_steps=8, batch_size=4, learning_rate=2e-3, max_seq_length=160, eval_examples=0, save_steps=1000
    )
    out = tmp_path_factory.mktemp("adapter")
    result = run_lora_training(config, spec=spec, plan=pick_device(), train_examples=examples, output_dir=out)
    return result.adapter_dir


@pytest.fixture
def finetuned_job(alice, valid_dataset, trained_adapter):
    from django.utils import timezone

    return job_row(
        alice,
        valid_dataset,
        status="completed",
        adapter_dir=str(trained_adapter),
        completed_at=timezone.now(),
    )
