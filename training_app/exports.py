"""Exports of completed fine-tunes: start (page, API, admin), the worker's work, the files and the bundle.

Layout under TUNA_DATA_DIR:
    gguf/<base model>/base-f16.gguf, base-q8_0.gguf      converted once per base, shared by every export
                                                          (TUNA_GGUF_DIR, by default <TUNA_DATA_DIR>/gguf)
    jobs/<id>/export/merged/                              merged weights (safetensors + tokenizer)
    jobs/<id>/export/adapter-f16.gguf, merged-q8_0.gguf, Modelfile, Modelfile.merged, README.md
    jobs/<id>/export/merged-q4_k_m.gguf, merged-q5_k_m.gguf, Modelfile.q4_k_m, Modelfile.q5_k_m
                                                          the merged fine-tune converted to f16 (not kept), then
                                                          quantized by llama-quantize
The bundle (README, Modelfiles and the GGUF files) is a tar streamed from those files, never built.

An export is written into jobs/<id>/export.next/ and takes the place of export/ only once it has succeeded: while a
re-export runs, and when it fails (e.g. on a full disk), the previous export's files stay as they were; once it has
succeeded, export/ holds exactly its formats. A job deleted while its export runs loses its folder when the export
stops (nothing it wrote outlives the job).
"""

from __future__ import annotations

import logging
import queue
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from datasets_app.examples import held_out_examples
from training_app.models import Export, TrainingJob
from training_app.services import check_job_storage
from training_app.storage import job_files_remove_if_deleted
from tuna_core.errors import Conflict, Invalid, Unavailable
from tuna_core.jobs import job_complete, job_enqueue, job_write
from tuna_core.quotas import check_active_jobs
from tuna_llm import gguf_export, ollama, sizes
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.evaluation import decoding_budget
from tuna_llm.loading import load_tokenizer_and_model, pick_device
from tuna_llm.parity import gguf_answers, parity_report, pytorch_answers
from tuna_llm.prompting import answer_text
from tuna_llm.serving.engine import Adapter
from tuna_llm.serving.registry import LoadedBaseModel

logger = logging.getLogger("tuna.export")

ALL_FORMATS = [choice.value for choice in Export.Format]
# The K-quant formats: format -> (llama-quantize's type, the parity and file name's key, bits for the wording).
QUANTIZED = {
    Export.Format.GGUF_Q5_K_M: ("Q5_K_M", "q5_k_m", 5),
    Export.Format.GGUF_Q4_K_M: ("Q4_K_M", "q4_k_m", 4),
}
BUNDLE_NAME = "bundle.tar"


class ExportRefused(Conflict):
    """An export that cannot start (the job is not completed, a format is unknown, llama.cpp is missing)."""


class ExportFormatUnknown(Invalid, ExportRefused):
    pass


class ExportToolsMissing(Unavailable, ExportRefused):
    """llama.cpp's converter (or llama-quantize, for a K-quant format) is not installed on this server."""


def export_dir(job: TrainingJob) -> Path:
    return Path(settings.TUNA_DATA_DIR) / "jobs" / str(job.pk) / "export"


def staging_dir(job: TrainingJob) -> Path:
    """Where an export is written until it has succeeded (then it becomes export_dir)."""
    return export_dir(job).with_name("export.next")


def base_gguf_dir(base_model: str) -> Path:
    return Path(settings.TUNA_GGUF_DIR) / base_model


def _relative(path: Path) -> str:
    """Stored paths: relative to the data directory when inside it (moves with it), else absolute."""
    return str(path.relative_to(settings.TUNA_DATA_DIR)) if path.is_relative_to(settings.TUNA_DATA_DIR) else str(path)


# -- starting -----------------------------------------------------------------------------------
def export_start(*, owner, job: TrainingJob, formats: list[str] | None = None) -> Export:
    """Queue an export of a completed job (an export already queued or running is returned as it is)."""
    formats = list(dict.fromkeys(formats or ALL_FORMATS))
    unknown = [f for f in formats if f not in ALL_FORMATS]
    if unknown:
        message = f"Unknown export format {unknown[0]!r}; choose from {', '.join(ALL_FORMATS)}."
        raise ExportFormatUnknown(message, errors={"formats": [message]})
    missing = gguf_export.export_unavailable()
    if missing and any(f.startswith("gguf") for f in formats):
        raise ExportToolsMissing(missing)
    missing = gguf_export.quantize_unavailable()
    if missing and any(f in QUANTIZED for f in formats):
        raise ExportToolsMissing(missing)
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().get(pk=job.pk)
        if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
            raise ExportRefused(f"Only a completed fine-tune can be exported; job #{job.pk} is {job.get_status_display().lower()}.")
        running = job.exports.filter(status__in=[Export.Status.QUEUED, Export.Status.RUNNING]).first()
        if running is not None:
            return running
        check_active_jobs(owner)
        estimate = export_storage_estimate(job, formats)
        kept, elsewhere = estimate if estimate is not None else (None, 0)
        check_job_storage(owner, "An export", kept, elsewhere)
        export = Export.objects.create(owner=owner, training_job=job, formats=formats)
        job_enqueue(export)
    logger.info("Export %s of job %s queued by %s (%s)", export.pk, job.pk, owner, ", ".join(formats))
    return export


def export_storage_estimate(job: TrainingJob, formats: list[str]) -> tuple[int, int] | None:
    """(bytes the job's export folder will keep, bytes written elsewhere: the base's shared GGUF conversions not made
    yet) for an export of `job` in `formats`, from its base model's weights and config.json (tuna_llm.sizes); None when
    the base's files are not on this server."""
    base_dir = base_gguf_dir(job.base_model)
    converted = [outtype for outtype in ("f16", "q8_0") if (base_dir / f"base-{outtype}.gguf").is_file()]
    model_dir = get_base_model_spec(job.base_model).config_dir()
    return sizes.export_estimate(model_dir, formats, adapter_dir=job.adapter_dir or None, converted=converted)


def latest_export(job: TrainingJob) -> Export | None:
    return job.exports.order_by("-created_at", "-id").first()


def serving_export(job: TrainingJob) -> Export | None:
    """The newest completed export with the f16 GGUF files (what llama.cpp serving uses)."""
    for export in job.exports.filter(status=Export.Status.COMPLETED).order_by("-created_at", "-id"):
        if export.file("gguf_base_f16") and export.file("gguf_lora"):
            return export
    return None


# -- the worker's work ----------------------------------------------------------------------------
class _Stages:
    """Progress for the page: a stage name and a share of the whole, written while this process holds the row."""

    def __init__(self, export: Export, names: list[str]) -> None:
        self.export, self.names, self.done = export, names, 0

    def start(self, name: str) -> None:
        job_write(Export, self.export.pk, stage=name, progress=self.done / len(self.names))
        self.done += 1

    def within(self, name: str, fraction: float) -> None:
        job_write(Export, self.export.pk, stage=name, progress=(self.done - 1 + fraction) / len(self.names))


def export_work(export: Export) -> None:
    """The worker's work for a claimed export (tuna_core.jobs keeps its run time however it ends)."""
    started = time.monotonic()
    job = export.training_job
    final, out = export_dir(job), staging_dir(job)
    try:
        shutil.rmtree(out, ignore_errors=True)  # what a killed export left
        out.mkdir(parents=True)
        try:
            files, parity = _export(export, job, out, final)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a failed export leaves the previous export's files as they were
            raise
        _replace(final, out)
        job_complete(
            export,
            stage="Done",
            progress=1.0,
            files=files,
            parity=parity,
            llama_cpp_version=gguf_export.llama_cpp_version() or "",
        )
    finally:
        job_files_remove_if_deleted(job)  # deleted while exporting: its folder goes, again
    logger.info("Export %s of job %s completed in %.0f s", export.pk, job.pk, time.monotonic() - started)


def _replace(final: Path, staged: Path) -> None:
    """The new export's folder takes the place of the previous one (two renames on one file system)."""
    old = final.with_name("export.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _export(export: Export, job: TrainingJob, out: Path, final: Path) -> tuple[list[dict], dict]:
    """Write the export into `out`; the files are listed where they will be once `out` has become `final`."""
    spec = get_base_model_spec(job.base_model)
    # fp32 whatever the deployment's precision: the files are made from the weights as trained, and the
    # parity check compares llama.cpp with them (bf16 rounds differently from f16 and q8_0 alike).
    plan = pick_device("fp32")
    formats = export.formats
    merged_gguf = Export.Format.GGUF_Q8_0 in formats
    f16 = Export.Format.GGUF_F16 in formats
    quantized = [QUANTIZED[f] for f in QUANTIZED if f in formats]  # Q5_K_M before Q4_K_M
    ggufs = f16 or merged_gguf or bool(quantized)
    examples = held_out_examples(job.dataset)[: settings.TUNA_PARITY_EXAMPLES]
    stages = [
        *(["Merging the adapter into the base weights"] if Export.Format.MERGED_SAFETENSORS in formats or merged_gguf or quantized else []),
        *(["Converting the base model to GGUF (f16)", "Converting the adapter to a LoRA GGUF"] if f16 else []),
        *(["Converting the base model to GGUF (q8_0)", "Converting the merged model to GGUF (q8_0)"] if merged_gguf else []),
        *(["Converting the merged model to GGUF (f16, to quantize)"] if quantized else []),
        *(f"Quantizing the merged model ({qtype}, llama-quantize)" for qtype, _, _ in quantized),
        *(["Writing the Modelfiles and the README"] if ggufs else []),
        *(["Parity: PyTorch answers", "Parity: llama.cpp answers"] if ggufs and examples else []),
    ]
    progress = _Stages(export, stages)
    files: list[dict] = []

    def add(path: Path, kind: str) -> None:
        inside = path.is_relative_to(out)
        name = str(path.relative_to(out)) if inside else path.name  # "merged/config.json", "base-f16.gguf"
        files.append({"name": name, "kind": kind, "size_bytes": path.stat().st_size, "path": _relative(final / name if inside else path)})

    merged = out / "merged"
    if Export.Format.MERGED_SAFETENSORS in formats or merged_gguf or quantized:
        progress.start("Merging the adapter into the base weights")
        gguf_export.merge_adapter(spec, plan, Path(job.adapter_dir), merged, hf_token=settings.HF_TOKEN)
        if Export.Format.MERGED_SAFETENSORS in formats:
            for path in sorted(p for p in merged.iterdir() if p.is_file()):
                add(path, "merged_safetensors")
    base_dir = base_gguf_dir(spec.name)
    names: dict[str, str] = {}
    if f16:
        progress.start("Converting the base model to GGUF (f16)")
        base_f16 = _base_gguf(spec, base_dir, "f16")
        progress.start("Converting the adapter to a LoRA GGUF")
        lora = gguf_export.convert_lora(Path(job.adapter_dir), Path(spec.load_path), out / "adapter-f16.gguf")
        add(base_f16, "gguf_base_f16")
        add(lora, "gguf_lora")
        names.update(base="base-f16.gguf", lora="adapter-f16.gguf")
    if merged_gguf:
        progress.start("Converting the base model to GGUF (q8_0)")
        add(_base_gguf(spec, base_dir, "q8_0"), "gguf_base_q8_0")
        progress.start("Converting the merged model to GGUF (q8_0)")
        add(gguf_export.convert_model(merged, out / "merged-q8_0.gguf", "q8_0"), "gguf_merged_q8_0")
        names.update(merged="merged-q8_0.gguf")
    quantization: dict[str, dict] = {}
    if quantized:
        progress.start("Converting the merged model to GGUF (f16, to quantize)")
        merged_f16 = gguf_export.convert_model(merged, out / "merged-f16.gguf", "f16")
        for qtype, key, bits in quantized:
            progress.start(f"Quantizing the merged model ({qtype}, llama-quantize)")
            done = gguf_export.quantize(merged_f16, out / f"merged-{key}.gguf", qtype)
            quantization[key] = {"bits": bits, **{k: v for k, v in done.items() if k != "size_bytes"}}
            add(out / f"merged-{key}.gguf", f"gguf_merged_{key}")
            names[key] = f"merged-{key}.gguf"
        merged_f16.unlink()  # only the quantizer's input
    if Export.Format.MERGED_SAFETENSORS not in formats:
        shutil.rmtree(merged, ignore_errors=True)  # only needed for the merged GGUFs

    parity: dict[str, Any] = {}
    if ggufs:
        progress.start("Writing the Modelfiles and the README")
        loaded = LoadedBaseModel(spec, plan, *load_tokenizer_and_model(spec, plan, hf_token=settings.HF_TOKEN))
        keeps_merged = Export.Format.MERGED_SAFETENSORS in formats
        for path in _write_ollama_files(loaded.tokenizer, out, names, job, keeps_merged):
            add(path, "modelfile" if path.name.startswith("Modelfile") else "readme")
        if examples:
            parity = _parity(job, loaded, examples, progress, out, base_dir, f16, merged_gguf, quantization)
            (out / "README.md").write_text(_readme(names, job, parity, keeps_merged), encoding="utf-8")
            for entry in files:
                if entry["name"] == "README.md":
                    entry["size_bytes"] = (out / "README.md").stat().st_size
    return files, parity


def _base_gguf(spec, base_dir: Path, outtype: str) -> Path:
    """The base model's GGUF, converted once per base (a finished file is never rewritten)."""
    path = base_dir / f"base-{outtype}.gguf"
    if not path.is_file():
        gguf_export.convert_model(Path(spec.load_path), path, outtype)
    return path


def _write_ollama_files(tokenizer, out: Path, names: dict[str, str], job: TrainingJob, merged: bool) -> list[Path]:
    """Modelfiles whose TEMPLATE, SYSTEM and stop PARAMETERs are derived from the model's own chat template
    (ollama.modelfile refuses a value it cannot write in Ollama's format), and the bundle's README."""
    chat = ollama.ollama_chat(tokenizer)
    written = []
    variants = [
        ("Modelfile", {"model_file": names.get("base"), "adapter_file": names.get("lora")}),
        ("Modelfile.merged", {"model_file": names.get("merged")}),
        *((f"Modelfile.{key}", {"model_file": names.get(key)}) for _, key, _ in QUANTIZED.values()),
    ]
    for filename, files in variants:
        if files["model_file"]:
            (out / filename).write_text(ollama.modelfile(chat, **files), encoding="utf-8")
            written.append(out / filename)
    (out / "README.md").write_text(_readme(names, job, {}, merged), encoding="utf-8")
    written.append(out / "README.md")
    return written


def _readme(names: dict[str, str], job: TrainingJob, parity: dict, merged: bool) -> str:
    quantized = [names[key] for _, key, _ in QUANTIZED.values() if key in names]
    modelfiles = ["Modelfile"] if names.get("base") else ["Modelfile.merged"] if names.get("merged") else []
    modelfiles += [f"Modelfile.{key}" for _, key, _ in QUANTIZED.values() if key in names]
    return ollama.bundle_readme(
        name=f"tuna-job-{job.pk}",
        base_gguf=names.get("base"),
        lora_gguf=names.get("lora"),
        merged_gguf=names.get("merged"),
        quantized_ggufs=quantized,
        merged_dir="merged" if merged else None,
        modelfile_name=modelfiles[0] if modelfiles else None,
        parity={name: {k: v for k, v in figures.items() if k != "mismatches"} for name, figures in parity.items()},
    )


def _parity(job, loaded, examples, progress, out, base_dir, f16, merged_gguf, quantization) -> dict[str, Any]:
    """Each GGUF variant's greedy answers through llama-server (the engine that serves it), one prompt at a time,
    against PyTorch's."""
    from tuna_llm.serving.llama_server import launched

    adapter = f"job-{job.pk}"
    loaded.attach_adapter(adapter, job.adapter_dir)
    budget = decoding_budget(loaded, [answer_text(messages[-1]) for messages in examples])
    total = len(examples)
    stage = "Parity: PyTorch answers"
    progress.start(stage)
    torch_answers = pytorch_answers(
        loaded, examples, adapter, budget, progress=lambda done: progress.within(f"{stage} ({done}/{total})", done / total)
    )
    stage = "Parity: llama.cpp answers"
    progress.start(stage)
    report = {}
    variants = []
    if f16:
        variants.append(("f16", base_dir / "base-f16.gguf", out / "adapter-f16.gguf", "base-f16.gguf + adapter-f16.gguf"))
    if merged_gguf:
        variants.append(("q8_0", out / "merged-q8_0.gguf", None, "merged-q8_0.gguf"))
    for key in quantization:
        variants.append((key, out / f"merged-{key}.gguf", None, f"merged-{key}.gguf"))
    for number, (name, model_path, lora, label) in enumerate(variants):

        def step(done: int, number=number, name=name) -> None:
            progress.within(f"{stage}: {name} ({done}/{total})", (number + done / total) / len(variants))

        with launched(model_path, [lora] if lora else [], parallel=1) as engine:
            lora_adapter = Adapter(lora.stem, lora) if lora else None
            answers = gguf_answers(engine, examples, budget, adapter=lora_adapter, progress=step)
        report[name] = parity_report(examples, torch_answers, answers, label=label)
        if name in quantization:
            figures = report[name]
            figures["quantization"] = quantization[name]
            figures["note"] = ollama.quantization_note(quantization[name], figures["identical"], figures["total"])
    return report


# -- files and the bundle -----------------------------------------------------------------------
def export_file(export: Export, name: str) -> Path | None:
    """The path of one listed file of a completed export (None for anything not listed)."""
    entry = next((f for f in export.files if f["name"] == name), None)
    if export.status != Export.Status.COMPLETED or entry is None:
        return None
    path = Path(settings.TUNA_DATA_DIR) / entry["path"]
    return path if path.is_file() else None


BUNDLE_KINDS = ("readme", "modelfile", "gguf_base_f16", "gguf_lora", "gguf_merged_q8_0", "gguf_merged_q5_k_m", "gguf_merged_q4_k_m")


def bundle_members(export: Export) -> list[tuple[str, Path]]:
    members = []
    for entry in export.files:
        if entry["kind"] in BUNDLE_KINDS:
            path = Path(settings.TUNA_DATA_DIR) / entry["path"]
            members.append((f"tuna-job-{export.training_job_id}/{path.name}", path))
    return members


def bundle_size(export: Export) -> int:
    """The tar's exact size: 512-byte headers, files padded to 512, two end blocks, padded to a 10 KiB record."""
    size = sum(512 + -(-path.stat().st_size // 512) * 512 for _, path in bundle_members(export)) + 1024
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def stream_bundle(export: Export, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bundle as a tar, produced while it is sent: a writer thread fills a small queue."""
    members = bundle_members(export)
    pieces: queue.Queue = queue.Queue(maxsize=8)
    stop = threading.Event()

    class Sink:
        def write(self, data: bytes) -> int:
            if stop.is_set():
                raise BrokenPipeError("the client went away")
            pieces.put(bytes(data))
            return len(data)

    def write() -> None:
        try:
            with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.USTAR_FORMAT, bufsize=chunk) as archive:
                for name, path in members:
                    info = archive.gettarinfo(str(path), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with path.open("rb") as handle:
                        archive.addfile(info, handle)
        except BrokenPipeError:
            pass
        finally:
            pieces.put(None)

    thread = threading.Thread(target=write, name=f"bundle-{export.pk}", daemon=True)
    thread.start()
    try:
        while (piece := pieces.get()) is not None:
            yield piece
    finally:
        stop.set()
        while thread.is_alive():  # unblock a writer waiting on a full queue
            try:
                pieces.get_nowait()
            except queue.Empty:
                thread.join(0.05)
