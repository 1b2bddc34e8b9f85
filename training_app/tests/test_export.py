"""Exports on the real embedded model and the real pinned llama.cpp (converter and runtime)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.support import job_row
from training_app import exports
from training_app.models import Export
from tuna_core.jobs import job_run
from tuna_llm.parity import pytorch_answers
from tuna_llm.serving.batching import generate_chat
from tuna_llm.serving.registry import registry
from tuna_llm.tests.modelfile import parse_modelfile

pytestmark = [pytest.mark.django_db, pytest.mark.model]


def run_export(export: Export) -> Export:
    job_run(Export, export.pk, exports.export_work)
    export.refresh_from_db()
    return export


def test_it_exports_every_format_and_the_gguf_answers_as_pytorch_does(alice, alice_api, alice_client, finetuned_job, fp32):
    response = alice_api.post(f"/api/training/{finetuned_job.pk}/export", {}, format="json")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    export = run_export(Export.objects.get(pk=response.json()["id"]))
    assert export.status == "completed", export.error_message
    kinds = {f["kind"] for f in export.files}
    assert kinds == {
        "merged_safetensors",
        "gguf_base_f16",
        "gguf_base_q8_0",
        "gguf_lora",
        "gguf_merged_q8_0",
        "gguf_merged_q5_k_m",
        "gguf_merged_q4_k_m",
        "modelfile",
        "readme",
    }
    # The merged f16 GGUF llama-quantize read is not kept, nor anything half-written.
    assert sorted(p.name for p in exports.export_dir(finetuned_job).glob("*.gguf")) == [
        "adapter-f16.gguf",
        "merged-q4_k_m.gguf",
        "merged-q5_k_m.gguf",
        "merged-q8_0.gguf",
    ]
    assert not list(exports.export_dir(finetuned_job).rglob("*.partial"))

    body = alice_api.get(f"/api/training/{finetuned_job.pk}/export").json()
    f16, q8 = body["parity"]["f16"], body["parity"]["q8_0"]
    assert f16["total"] == q8["total"] > 0
    assert f16["identical"] / f16["total"] >= 0.95 and body["parity_passed"]  # f16 + LoRA in llama.cpp = PyTorch
    assert f16["tokens_per_second_gguf"] > 0 and f16["tokens_per_second_pytorch"] > 0
    assert 0 <= q8["identical"] <= q8["total"]  # q8_0's figure is shown, whatever it is
    # The K-quants' figures are shown as they are, with what llama-quantize did (SmolLM2's 576-wide rows do not
    # divide into K-quant blocks of 256: those tensors are kept at a wider type).
    for key, qtype, bits in (("q5_k_m", "Q5_K_M", 5), ("q4_k_m", "Q4_K_M", 4)):
        quantized = body["parity"][key]
        assert quantized["total"] == f16["total"] and 0 <= quantized["identical"] <= quantized["total"]
        assert quantized["quantization"]["type"] == qtype and quantized["quantization"]["bits"] == bits
        assert quantized["quantization"]["fallbacks"], quantized["quantization"]
        differ = quantized["total"] - quantized["identical"]
        assert quantized["note"].startswith(f"a {bits}-bit model differs: {differ} of {quantized['total']} answers differ")
        assert len(quantized["mismatches"]) == min(differ, 20)
    sizes = {f["kind"]: f["size_bytes"] for f in body["files"]}
    assert sizes["gguf_merged_q4_k_m"] < sizes["gguf_merged_q5_k_m"] < sizes["gguf_merged_q8_0"]
    assert len(f16["mismatches"]) == f16["total"] - f16["identical"]

    # Every listed file downloads, streamed, with the token; the bundle is a tar of the right length.
    files = {f["kind"]: f for f in body["files"]}
    lora = alice_api.get(files["gguf_lora"]["url"])
    assert lora.status_code == 200 and b"".join(lora.streaming_content)[:4] == b"GGUF"
    bundle = alice_api.get(files["bundle"]["url"])
    data = b"".join(bundle.streaming_content)
    assert len(data) == int(bundle["Content-Length"]) == files["bundle"]["size_bytes"]
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    prefix = f"tuna-job-{finetuned_job.pk}/"
    assert {n.removeprefix(prefix) for n in names} == {
        "README.md",
        "Modelfile",
        "Modelfile.merged",
        "base-f16.gguf",
        "adapter-f16.gguf",
        "merged-q8_0.gguf",
        "merged-q5_k_m.gguf",
        "merged-q4_k_m.gguf",
        "Modelfile.q5_k_m",
        "Modelfile.q4_k_m",
    }
    readme = tarfile.open(fileobj=io.BytesIO(data)).extractfile(prefix + "README.md").read().decode()
    assert "ollama create" in readme and "llama" in readme
    assert "llama-server -m merged-q4_k_m.gguf" in readme and body["parity"]["q4_k_m"]["note"] in readme
    # Both Modelfiles read as Ollama reads them: the base with the adapter, and the merged file alone.
    modelfiles = {
        name: tarfile.open(fileobj=io.BytesIO(data)).extractfile(prefix + name).read().decode()
        for name in ("Modelfile", "Modelfile.merged", "Modelfile.q4_k_m", "Modelfile.q5_k_m")
    }
    parsed = parse_modelfile(modelfiles["Modelfile"])
    assert (parsed.value("from"), parsed.value("adapter")) == ("./base-f16.gguf", "./adapter-f16.gguf") and parsed.value("template")
    assert parse_modelfile(modelfiles["Modelfile.merged"]).value("from") == "./merged-q8_0.gguf"
    assert parse_modelfile(modelfiles["Modelfile.q4_k_m"]).value("from") == "./merged-q4_k_m.gguf"
    assert parse_modelfile(modelfiles["Modelfile.q5_k_m"]).value("from") == "./merged-q5_k_m.gguf"

    # The merged weights load in plain transformers (no peft) and answer as base + adapter does.
    from transformers import AutoModelForCausalLM

    merged_dir = exports.export_dir(finetuned_job) / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    loaded = registry.get()
    loaded.attach_adapter("parity-check", finetuned_job.adapter_dir)
    prompt = [{"role": "user", "content": "Extract the order as JSON: two red caps, size M, express."}]
    expected = generate_chat(loaded, prompt, adapter="parity-check", max_new_tokens=24).text
    text = loaded.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = merged.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == expected

    page = alice_client.get(f"/training/{finetuned_job.pk}")
    assert page.status_code == 200 and b'id="parity"' in page.content and b"bundle.tar" in page.content
    assert (
        f'data-quantization="q4_k_m">Q4_K_M: a 4-bit model differs: {body["parity"]["q4_k_m"]["total"] - body["parity"]["q4_k_m"]["identical"]} of'.encode()
        in page.content
    )


def test_it_decodes_the_parity_answers_in_one_batch_and_each_is_its_answer_alone(finetuned_job, fp32):
    """The parity check's PyTorch side decodes its prompts as one batched call (as evaluation does): the
    batch-invariance promise (tuna_llm.serving) makes each answer the one it gets decoded alone."""
    loaded = registry.get()
    loaded.attach_adapter("parity-batch", finetuned_job.adapter_dir)
    prompts = [
        "Extract the order as JSON: two red caps, size M, express.",
        "Say hello in French.",
        "Écris « bonjour » trois fois, s'il te plaît.",
        "Name one fruit.",
    ]
    examples = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": "-"}] for prompt in prompts]
    seen = []
    batched = pytorch_answers(loaded, examples, "parity-batch", 16, progress=seen.append)
    alone = [generate_chat(loaded, messages[:-1], adapter="parity-batch", max_new_tokens=16) for messages in examples]
    assert [answer.text for answer in batched] == [answer.text for answer in alone]
    assert seen == [1, 2, 3, 4]


def test_it_refuses_to_export_a_job_that_is_not_completed(alice, alice_api, valid_dataset):
    job = job_row(alice, valid_dataset, status="training")
    response = alice_api.post(f"/api/training/{job.pk}/export", {}, format="json")
    assert response.status_code == 409 and "Only a completed fine-tune can be exported" in response.json()["detail"]
    assert not Export.objects.exists()
    unknown = alice_api.post(f"/api/training/{job.pk}/export", {"formats": ["onnx"]}, format="json")
    assert unknown.status_code == 400 and unknown.json()["errors"] == {"formats[0]": ['"onnx" is not a valid choice.']}
    missing = alice_api.get(f"/api/training/{job.pk}/export")
    assert missing.status_code == 404 and "has not been exported yet" in missing.json()["detail"]


def test_it_keeps_another_users_exports_out_of_reach(bob_api, finetuned_job):
    assert bob_api.post(f"/api/training/{finetuned_job.pk}/export", {}, format="json").status_code == 404
    assert bob_api.get(f"/api/training/{finetuned_job.pk}/export").status_code == 404
    assert bob_api.get(f"/api/training/{finetuned_job.pk}/export/files/Modelfile").status_code == 404
    assert not Export.objects.exists()


def test_it_fails_a_broken_conversion_with_the_converters_message_and_can_retry(alice, finetuned_job, tmp_path):
    broken = tmp_path / "adapter"
    shutil.copytree(finetuned_job.adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    good = finetuned_job.adapter_dir
    type(finetuned_job).objects.filter(pk=finetuned_job.pk).update(adapter_dir=str(broken))
    finetuned_job.refresh_from_db()

    failed = run_export(exports.export_start(owner=alice, job=finetuned_job, formats=["gguf_f16"]))
    assert failed.status == "failed"
    assert "convert_lora_to_gguf.py failed" in failed.error_message
    out = exports.export_dir(finetuned_job)
    assert not list(out.rglob("*.partial")) and not (out / "adapter-f16.gguf").exists()
    assert failed.files == [] and exports.export_file(failed, "adapter-f16.gguf") is None

    type(finetuned_job).objects.filter(pk=finetuned_job.pk).update(adapter_dir=good)
    finetuned_job.refresh_from_db()
    retried = run_export(exports.export_start(owner=alice, job=finetuned_job, formats=["gguf_f16"]))
    assert retried.status == "completed", retried.error_message
    assert {f["kind"] for f in retried.files} == {"gguf_base_f16", "gguf_lora", "modelfile", "readme"}
    assert Path(exports.export_file(retried, "adapter-f16.gguf")).read_bytes()[:4] == b"GGUF"
