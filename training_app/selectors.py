"""Reads for training jobs."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, NamedTuple

from django.db.models import QuerySet
from django.http import FileResponse, Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404

from training_app.models import LossPoint, TrainingJob
from training_app.services import job_dir
from tuna_core import admission
from tuna_core.errors import NotFound
from tuna_llm.catalog import EMBEDDED_GGUF, UnknownBaseModel, get_base_model_spec
from tuna_llm.training import COMPLETE_MARKER, CONFIG_FILENAME, NOISE_SHARE
from tuna_llm.training_config import RANGES

# "Still improving" (more epochs would likely help) needs all of:
# - enough evidence: at least MIN_TREND_POINTS measurements (step 0 included); two points, before and after, show
#   that it learned, not whether it was still learning at the end;
# - a last improvement that counts against what was left: the last measurement is the lowest, below the best before
#   it by more than STILL_FALLING of that best and by more than the noise share of the starting loss;
# - something left to gain: the last loss above LITTLE_LEFT of the starting loss and above NOTHING_LEFT (a loss of
#   0.02 nats per token is about 98% probability on each answer token; 0.007 is 99.3%: nothing left to win).
STILL_FALLING = 0.03
MIN_TREND_POINTS = 3
LITTLE_LEFT = 0.05
NOTHING_LEFT = 0.02
LEARNED = 0.5  # best validation loss at most half the starting one
LEARNED_SOME = 0.9


def jobs_for_user(user) -> QuerySet[TrainingJob]:
    return TrainingJob.objects.filter(owner=user).select_related("dataset")


def get_job_for_user(user, pk: int) -> TrainingJob:
    """Another user's job is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(TrainingJob.objects.select_related("dataset", "parent"), pk=pk, owner=user)


# Weights go into a zip as they are (deflating them saves little and costs the server's time); text is deflated.
STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
BASE_INFO_FILENAME = "tuna_base_model.json"
ZIP_CHUNK = 1 << 20


def _compression(path: Path) -> int:
    return zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED


def _regular_files(root: Path) -> list[Path]:
    """The plain files under root, sorted; links are left out (nothing outside the folder is sent through one)."""
    found = []
    for folder, _dirs, names in os.walk(root):  # does not descend into linked folders
        found += [path for name in names if (path := Path(folder) / name).is_file() and not path.is_symlink()]
    return sorted(found)


@dataclass(frozen=True)
class BaseWeights:
    """The base a job was trained on, told without the server's paths: its catalog name, where it comes from, and
    the folder of its exact weights on this server (None where none is offered: a hub model, or not there)."""

    name: str
    source: str  # "embedded:<package>", a hub id, or "local" (a folder on the server: not named)
    kind: str
    folder: Path | None  # only for the embedded base: the operator's own folders (kind "local") are not offered

    @property
    def note(self) -> str:
        if self.kind == "embedded":
            return (
                f"{self.name} as LLM Tuna trained on it: dequantized from the Q4_1 GGUF embedded in LLM Tuna "
                f"({EMBEDDED_GGUF}), not the hub's original weights. Download it from the job's page (base-model.zip)."
            )
        if self.kind == "hub":
            return f"The Hugging Face hub model {self.source}."
        return (
            f"{self.name}: a model folder the operator of this LLM Tuna server provided (TUNA_BASE_MODELS); it is not "
            "offered for download: ask the operator where it comes from."
        )

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "weights": self.note}

    @property
    def peft_name(self) -> str:
        """What adapter_config.json names as the base: the hub id, or the folder base-model.zip unpacks to."""
        return self.source if self.kind == "hub" else self.name


def base_weights(job: TrainingJob) -> BaseWeights | None:
    """The job's base model from the catalog (None when the catalog no longer has it)."""
    try:
        spec = get_base_model_spec(job.base_model)
    except UnknownBaseModel:
        return None
    folder = Path(spec.load_path) if spec.kind == "embedded" else None
    if folder is not None and not (folder / "config.json").is_file():
        folder = None  # not prepared yet (converted on first use) or gone
    return BaseWeights(spec.name, spec.source if spec.kind != "local" else "local", spec.kind, folder)


def _public_json(path: Path, base: BaseWeights | None) -> bytes:
    """adapter_config.json and the resolved settings with the base named by catalog name and source, not by a
    path on the server."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if base is not None:
        if "base_model_name_or_path" in data:
            data["base_model_name_or_path"] = base.peft_name
        if "base_model_source" in data:
            data["base_model_source"] = base.source
    return json.dumps(data, indent=2).encode("utf-8")


def adapter_archive(job: TrainingJob) -> tuple[IO[bytes], str]:
    """The job's adapter directory as a zip in a temporary file (gone once closed) and its file name; Http404 when
    there is none. The base is named by its catalog name and source (BASE_INFO_FILENAME says which weights)."""
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir or not Path(job.adapter_dir).is_dir():
        raise Http404("This job has no adapter to download.")
    root = Path(job.adapter_dir)
    folder = Path(f"tuna-job-{job.pk}-adapter")
    base = base_weights(job)
    file = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the response, which closes it)
    try:
        with zipfile.ZipFile(file, "w") as archive:
            for path in _regular_files(root):
                name = str(folder / path.relative_to(root))
                if path.name in ("adapter_config.json", CONFIG_FILENAME) and path.parent == root:
                    archive.writestr(name, _public_json(path, base), compress_type=zipfile.ZIP_DEFLATED)
                else:
                    archive.write(path, name, compress_type=_compression(path))
            if base is not None:
                archive.writestr(
                    str(folder / BASE_INFO_FILENAME), json.dumps(base.describe(), indent=2), compress_type=zipfile.ZIP_DEFLATED
                )
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file, f"{folder}.zip"


def adapter_download(job: TrainingJob) -> FileResponse:
    """The adapter zip, sent from its temporary file inside one of the owner's download slots (tuna_core.admission)."""
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir or not Path(job.adapter_dir).is_dir():
        raise Http404("This job has no adapter to download.")
    with admission.download_slot(job.owner) as ticket:
        file, filename = adapter_archive(job)
        return admission.file_response(file, ticket, as_attachment=True, filename=filename, content_type="application/zip")


class _Sink(io.RawIOBase):
    """Where a zip is written while it is sent: what was written since the last `take`, never the whole archive."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def zip_chunks(members: list[tuple[Path, str]]) -> Iterator[bytes]:
    """A zip of `members` (file, name in the archive) made while it is sent, a block at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", allowZip64=True) as archive:
        for path, name in members:
            info = zipfile.ZipInfo.from_file(path, name)
            info.compress_type = _compression(path)
            with path.open("rb") as source, archive.open(info, "w") as target:
                while block := source.read(ZIP_CHUNK):
                    target.write(block)
                    if chunk := sink.take():
                        yield chunk
            if chunk := sink.take():
                yield chunk
    yield sink.take()


# What base-model.zip holds of the embedded base's folder: its weights, configs, tokenizer and chat template; nothing
# else that may lie there (the folder's top level only, plain files, no links).
BASE_MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def base_model_files(folder: Path) -> list[Path]:
    """The model files of a base's folder (BASE_MODEL_FILES and *.safetensors), sorted."""
    return sorted(
        path
        for path in folder.iterdir()
        if (path.name in BASE_MODEL_FILES or path.suffix == ".safetensors") and path.is_file() and not path.is_symlink()
    )


def _base_not_offered(base: BaseWeights | None) -> str:
    if base is None:
        return "This job's base model is no longer in this server's catalog (TUNA_BASE_MODELS): no weights to download."
    if base.kind == "hub":
        return f"This job's base model {base.name} comes from the Hugging Face hub: download {base.source} from there."
    if base.kind == "local":
        return (
            f"This job's base model {base.name} is a model folder the operator of this server provided (TUNA_BASE_MODELS); "
            "LLM Tuna offers only its embedded base for download: ask the operator where this one comes from."
        )
    return (
        f"This job's base model {base.name} is embedded in LLM Tuna, but its prepared weights are not on this server now "
        "(they are made from the embedded GGUF on first use): try again after a job or a chat has used it."
    )


def base_model_download(job: TrainingJob) -> StreamingHttpResponse:
    """The embedded base's exact weights the job was trained on (dequantized from its Q4_1 GGUF) as a zip of one
    folder named by the catalog name (what the adapter's config names), model files only, made while it is sent,
    inside one of the owner's download slots. Any other base is NotFound, its message saying where it comes from:
    a hub model (the hub has it), or an operator's local folder (not offered: the operator's whole folder is theirs)."""
    base = base_weights(job)
    if base is None or base.kind != "embedded" or base.folder is None:
        raise NotFound(_base_not_offered(base))
    members = [(path, str(Path(base.name) / path.name)) for path in base_model_files(base.folder)]
    with admission.download_slot(job.owner) as ticket:
        response = admission.streaming_response(zip_chunks(members), ticket, content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="{base.name}.zip"'
        return response


def _lineage(job: TrainingJob) -> list[TrainingJob]:
    """The job and the runs it continues, oldest first (a preference-tuned run, and a fine-tune started from another
    one, have a history of their own)."""
    chain = [job]
    while chain[-1].is_continuation:
        chain.append(TrainingJob.objects.get(pk=chain[-1].parent_id))
    return chain[::-1]


def loss_chart_data(job: TrainingJob) -> dict:
    """One history: a continued run's points follow those of the runs it continues, up to where it took over."""
    chain = _lineage(job)
    train, evals = [], []
    for run, successor in zip(chain, [*chain[1:], None], strict=True):
        points = LossPoint.objects.filter(job=run)
        if successor is not None:
            points = points.filter(step__lte=successor.step_offset - run.step_offset)
        for step, loss, eval_loss in points.values_list("step", "loss", "eval_loss"):
            if loss is not None:
                train.append({"x": run.step_offset + step, "y": loss})
            if eval_loss is not None:
                evals.append({"x": run.step_offset + step, "y": eval_loss})
    return {"train": train, "eval": evals, "total_steps": job.step_offset + job.total_steps}


def training_logs(job: TrainingJob) -> tuple[list[dict], list[dict]]:
    """(training steps, validations) of one run. Every training row has a numeric loss; a validation
    measured at the same step also appears on that row as `eval_loss`, and every validation (step 0,
    before any update, included) is in the second list."""
    train, evals = [], []
    for point in LossPoint.objects.filter(job=job):
        if point.eval_loss is not None:
            evals.append({"step": point.step, "eval_loss": point.eval_loss, "epoch": point.epoch, "timestamp": point.created_at})
        if point.loss is not None:
            train.append(
                {
                    "step": point.step,
                    "loss": point.loss,
                    "eval_loss": None,
                    "learning_rate": point.learning_rate,
                    "epoch": point.epoch,
                    "timestamp": point.created_at,
                }
            )
    by_step = {row["step"]: row for row in train}
    for row in evals:
        if row["step"] in by_step:
            by_step[row["step"]]["eval_loss"] = row["eval_loss"]
    return train, evals


EXTRA_SETTINGS = {"learning_rate_multiplier": "Learning-rate multiplier", "dpo_beta": "DPO beta"}


def settings_rows(config: dict, reasons: dict) -> list[dict]:
    """Every setting with its readable name, value and why it has that value."""
    rows = [{"name": "target_modules", "label": "LoRA layers", "value": ", ".join(config.get("target_modules", []))}]
    rows += [{"name": name, "label": spec.label, "value": config.get(name)} for name, spec in RANGES.items() if name in config]
    rows += [{"name": name, "label": label, "value": config[name]} for name, label in EXTRA_SETTINGS.items() if name in reasons]
    for row in rows:
        row["reason"] = reasons.get(row["name"], "")
        row["auto"] = bool(row["reason"]) and row["reason"] != "set by you"
    if "batch_size" in config:
        after = next(i for i, row in enumerate(rows) if row["name"] == "batch_size") + 1
        rows[after:after] = _batch_rows(config, reasons)
    return rows


def _batch_rows(config: dict, reasons: dict) -> list[dict]:
    """The processes a run trains on and the examples each update learns from (what the per-process batch makes)."""
    processes = config.get("processes", 1)  # rows from before several processes trained on one
    accumulation = config.get("gradient_accumulation_steps", 1)
    effective = config["batch_size"] * processes * accumulation
    why = reasons.get("processes", "")
    return [
        {"name": "processes", "label": "Processes", "value": processes, "reason": why, "auto": bool(why)},
        {
            "name": "effective_batch",
            "label": "Effective batch",
            "value": effective,
            "reason": f"examples per update: {config['batch_size']} per process × {processes} process{'es' if processes != 1 else ''}"
            f" × {accumulation} accumulated",
            "auto": False,
        },
    ]


@dataclass(frozen=True)
class LearningVerdict:
    """Whether a finished run learned, in plain words, from its validation (or training) loss.

    `still_improving` is True only when the evidence says more epochs would likely help (see the rule above); the
    page then offers to continue the run, or to try several settings. `trend` says why, in a word: "falling",
    "levelled" (the last fall was small against what was left), "little_left" (the loss is already near zero),
    "rising", "too_few" (too few measurements to tell) or "" (unknown)."""

    kind: str  # "learned", "some", "none", "unknown"
    headline: str
    detail: str
    still_improving: bool
    start: float | None = None
    best: float | None = None
    trend: str = ""


def _smoothed(series: list[tuple[int, float]], buckets: int = 5) -> list[tuple[int, float]]:
    """The training loss is measured on one batch at a time: a trend is read from the means of a few consecutive
    stretches (each at its last step), not from the last two noisy values."""
    if len(series) < 2 * buckets:
        return series
    size = len(series) / buckets
    chunks = [series[round(i * size) : round((i + 1) * size)] for i in range(buckets)]
    return [(chunk[-1][0], sum(value for _, value in chunk) / len(chunk)) for chunk in chunks]


def _trend(series: list[tuple[int, float]], start: float, *, validation: bool = True) -> tuple[str, str]:
    """(trend, sentence) of a run's last measurements: whether more epochs would likely help, and why (or why not)."""
    last = series[-1][1]
    best = min(value for _, value in series)
    if last <= max(LITTLE_LEFT * start, NOTHING_LEFT):
        share = f" ({last / start:.1%} of where it started)" if start else ""
        return "little_left", f" At {last:.3g} the loss has little left to gain{share}: more epochs would not help much."
    if len(series) < MIN_TREND_POINTS:
        return "too_few", (
            f" Measured only {len(series)} times (before and after training): too few points to tell whether it was still "
            "improving at the end" + (" (a smaller “Validate every” measures more often)." if validation else ".")
        )
    previous_best = min(value for _, value in series[:-1])
    gain = previous_best - last
    if last > best + NOISE_SHARE * start:
        return "rising", ""  # said with the checkpoint kept
    if gain > STILL_FALLING * previous_best and gain > NOISE_SHARE * start:
        return "falling", (
            f" The loss was still falling when training stopped: its last measurement was the lowest, {gain / previous_best:.0%} "
            f"below the best before it ({previous_best:.3g} → {last:.3g}): more epochs would likely help."
        )
    return "levelled", (
        f" The loss had levelled off (last {last:.3g}, best before it {previous_best:.3g}): more epochs of the same would "
        "likely not help much."
    )


def learning_verdict(job: TrainingJob) -> LearningVerdict | None:
    if job.status != TrainingJob.Status.COMPLETED:
        return None
    points = list(LossPoint.objects.filter(job=job).values_list("step", "loss", "eval_loss"))
    evals = [(step, value) for step, _, value in points if value is not None]
    source, trend_series = "validation loss", evals
    if len(evals) < 2:
        # No validation examples: judge from the training loss (a weaker sign, and said so).
        evals = [(step, value) for step, value, _ in points if value is not None]
        source, trend_series = "training loss (no validation examples)", _smoothed(evals)
    if len(evals) < 2:
        return LearningVerdict("unknown", "Not enough loss measurements to tell whether it learned.", "", False)
    start = evals[0][1] if job.parent_id is None else _parent_start(job, evals[0][1])
    best = min(value for _, value in evals)
    last = evals[-1][1]
    trend, sentence = _trend(trend_series, start, validation=source == "validation loss")
    if trend == "rising" and job.best_step is None:
        sentence = " The loss rose after its lowest point: more epochs would not help."
    change = f"{source} {start:.3g} → {best:.3g} ({(best - start) / start:+.0%})" if start else f"{source} {best:.3g}"
    if best <= LEARNED * start:
        kind, headline = "learned", "It learned."
    elif best <= LEARNED_SOME * start:
        kind, headline = "some", "It learned a little."
    else:
        kind, headline = "none", "It did not learn much."
    detail = change + "." + sentence
    if job.best_step is not None and job.best_step < job.current_step:
        detail += (
            f" It was lowest at step {job.step_offset + job.best_step} and rose clearly afterwards (over-fitting): the checkpoint of "
            f"step {job.step_offset + job.best_step} is kept (served, evaluated, downloaded) instead of the final weights."
        )
    elif job.best_step is not None and last <= best:
        detail += " The final weights, those with the lowest validation loss, are kept (served, evaluated, downloaded)."
    elif job.best_step is not None:
        detail += " The final weights are kept (served, evaluated, downloaded): after its lowest point the validation loss rose by no more than noise."
    return LearningVerdict(kind, headline, detail, trend == "falling", start, best, trend)


def _parent_start(job: TrainingJob, fallback: float) -> float:
    """A continued run is judged from where the whole history started."""
    root = _lineage(job)[0]
    first = LossPoint.objects.filter(job=root, eval_loss__isnull=False).order_by("step").values_list("eval_loss", flat=True).first()
    return first if first is not None else fallback


class Checkpoint(NamedTuple):
    """A checkpoint a run kept: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that loads
    on the job's base model with its tokenizer. `step` is the run's own step."""

    step: int
    path: Path
    train_loss: float | None
    valid_loss: float | None
    created_at: datetime


def job_checkpoints(job: TrainingJob) -> list[Checkpoint]:
    """The checkpoints the job keeps on disk (saved whole), oldest first, with the losses measured at their step
    (the training loss of the last logged step up to it)."""
    root = job_dir(job) / "checkpoints"
    found = []
    for path in root.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        marker = path / COMPLETE_MARKER
        if step.isdigit() and marker.is_file() and (path / "adapter_config.json").is_file():
            found.append((int(step), path, datetime.fromtimestamp(marker.stat().st_mtime, tz=UTC)))
    if not found:
        return []
    points = list(LossPoint.objects.filter(job=job, step__lte=max(step for step, _, _ in found)).values_list("step", "loss", "eval_loss"))
    checkpoints = []
    for step, path, created in sorted(found, key=lambda item: item[0]):
        train = [loss for at, loss, _ in points if loss is not None and at <= step]
        valid = [loss for at, _, loss in points if loss is not None and at == step]
        checkpoints.append(Checkpoint(step, path, train[-1] if train else None, valid[-1] if valid else None, created))
    return checkpoints
