"""Which runtime answers a call (TUNA_SERVING_ENGINE), and this process's llama.cpp models.

- ``transformers``: every model is served by transformers + peft (the weights as trained).
- ``llamacpp``: every model is served by llama.cpp from its exported GGUF files: a fine-tune needs a
  completed f16 export (the base GGUF and the job's LoRA GGUF), a base model its f16 GGUF (made by the
  first export of any fine-tune of that base). Without them the call is refused (409) with how to export.
- ``auto`` (the default): llama.cpp where the export is known to answer as PyTorch does, transformers
  otherwise. A fine-tune: its newest serving export passed its parity check. A base model: its f16 GGUF
  is present and some export of a fine-tune of that base passed its parity check (that check ran this
  very base GGUF, with the fine-tune's LoRA on top).
- ``remote``: every model whose base has a remote engine by URL (TUNA_REMOTE_ENGINES: vLLM, SGLang, a llama-server
  run elsewhere) is served through it, the others by transformers. Under ``auto`` a remote engine comes first for
  a fine-tune whose engine check passed on it (inference_app.remote_engines.route).

``engine_for`` is the one place that picks the engine of a call (tuna_llm.serving.engine's interface): the
transformers engine of the base model (tuna_llm.serving.batching, on the process's device thread:
tuna_llm.serving.compute), or llama.cpp's own server for its base GGUF (tuna_llm.serving.llama_server's pool:
one llama-server per base GGUF per process, started on first use and supervised, shared by the base model
and its fine-tunes, each call applying its own LoRA GGUF; spoken to through
tuna_llm.serving.openai_engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from inference_app import remote_engines
from training_app.exports import base_gguf_dir, serving_export
from training_app.models import Export, TrainingJob
from tuna_core.errors import Conflict
from tuna_llm import llama_tools
from tuna_llm.loading import ModelUnavailable
from tuna_llm.serving import batching, llama_server
from tuna_llm.serving.compute import compute_thread
from tuna_llm.serving.engine import Adapter, Engine
from tuna_llm.serving.llama_server import ENGINE_NAME as LLAMACPP
from tuna_llm.serving.registry import registry
from tuna_llm.serving.remote import KINDS as REMOTE_KINDS

TRANSFORMERS = batching.ENGINE_NAME
ENGINES = (TRANSFORMERS, LLAMACPP, *REMOTE_KINDS)
BASE_GGUF = "base-f16.gguf"

logger = logging.getLogger(__name__)


class NotServable(Conflict):
    """The chosen engine cannot serve this model (yet); the message says what to do."""

    code = "model_not_ready"


@dataclass(frozen=True)
class Route:
    engine: str
    base_gguf: Path | None = None
    lora_gguf: Path | None = None


def llama_cpp_installed() -> bool:
    """llama-server is installed (`make install` builds it; TUNA_LLAMA_SERVER_BIN names another)."""
    try:
        llama_tools.binary(llama_tools.SERVER)
    except llama_tools.LlamaToolMissing:
        return False
    return True


@dataclass(frozen=True)
class AdapterChoice:
    """The PEFT adapter a call of a fine-tune applies: its name on the base model and its directory (the job's
    final adapter, or one of its kept checkpoints)."""

    name: str
    path: str
    checkpoint: bool = False


def route_for(*, base_model: str, job: TrainingJob | None, checkpoint: bool = False) -> Route:
    mode = settings.TUNA_SERVING_ENGINE
    if mode in ("transformers", "remote"):  # remote: a base without a remote engine (inference_app.remote_engines)
        return Route(TRANSFORMERS)
    if checkpoint:  # a kept checkpoint has no GGUF export: its PEFT weights are served as trained
        if mode == "llamacpp":
            raise NotServable(
                "A checkpoint is served from its PEFT adapter by transformers; this server serves every model with llama.cpp "
                "(TUNA_SERVING_ENGINE=llamacpp). Call the completed fine-tune instead, or serve with TUNA_SERVING_ENGINE=auto."
            )
        return Route(TRANSFORMERS)
    if job is not None:
        route, passed = _job_route(job)
    else:
        route, passed = _base_route(base_model)
    if mode == "auto":
        return route if route is not None and passed and llama_cpp_installed() else Route(TRANSFORMERS)
    if route is None:
        raise NotServable(_how_to_export(base_model, job))
    return route


@dataclass(frozen=True)
class Chosen:
    """The engine that answers a model's calls, and the adapter it applies (None: the base model)."""

    engine: Engine
    adapter: Adapter | None


def engine_for(*, base_model: str, job: TrainingJob | None, adapter: AdapterChoice | None = None) -> Chosen:
    """The one place that decides which engine answers a call (TUNA_SERVING_ENGINE, exports, parity: see
    ``route_for``), loading it on first use. NotServable (with what to do) when it cannot answer. ``adapter``:
    the PEFT adapter to apply on transformers (default: the job's final one)."""
    if job is not None and adapter is None:
        adapter = AdapterChoice(f"job-{job.pk}", job.adapter_dir)
    checkpoint = bool(adapter and adapter.checkpoint)
    remote = remote_engines.route(base_model=base_model, job=job, mode=settings.TUNA_SERVING_ENGINE, checkpoint=checkpoint)
    if remote is not None:  # a remote engine by URL (TUNA_REMOTE_ENGINES)
        return Chosen(*remote)
    route = route_for(base_model=base_model, job=job, checkpoint=checkpoint)
    if route.engine == LLAMACPP:
        lora = route.lora_gguf if job is not None else None
        try:  # a server that cannot start in time raises EngineUnavailable: the service's 503 with Retry-After
            engine, _ = llama_server.pool.engine_for(route.base_gguf, lora)
        except llama_tools.LlamaToolMissing as exc:  # (its message names the server's path: logged, not answered)
            logger.warning("%s", exc)
            raise NotServable(
                f"llama.cpp cannot serve {_model_id(base_model, job)}: llama-server is not installed on this server "
                "(`make install` builds it, or TUNA_LLAMA_SERVER_BIN names one)."
            ) from exc
        except llama_server.NoChatTemplate as exc:
            raise NotServable(f"llama.cpp cannot serve {_model_id(base_model, job)}: {exc}") from exc
        except FileNotFoundError as exc:  # an export's file removed since it was routed (its name, not its path)
            raise NotServable(
                f"llama.cpp cannot serve {_model_id(base_model, job)}: its GGUF file {Path(exc.filename or '').name} "
                "is missing. Export it again."
            ) from exc
        return Chosen(engine, Adapter(f"job-{job.pk}", lora) if lora is not None else None)
    try:
        loaded = registry.get_on(compute_thread, base_model)
    except ModelUnavailable as exc:
        raise NotServable(str(exc)) from exc
    return Chosen(batching.engine_for(loaded), Adapter(adapter.name, adapter.path) if adapter is not None else None)


def _model_id(base_model: str, job: TrainingJob | None) -> str:
    return job.model_id if job is not None else f"base:{base_model}"


def _job_route(job: TrainingJob) -> tuple[Route | None, bool]:
    export = serving_export(job)
    if export is None:
        return None, False
    base, lora = _data_path(export.file("gguf_base_f16")["path"]), _data_path(export.file("gguf_lora")["path"])
    if not (base.is_file() and lora.is_file()):
        return None, False
    return Route(LLAMACPP, base, lora), export.parity_passed


def _base_route(base_model: str) -> tuple[Route | None, bool]:
    path = base_gguf_dir(base_model) / BASE_GGUF
    if not path.is_file():
        return None, False
    exports = Export.objects.filter(status=Export.Status.COMPLETED, training_job__base_model=base_model).only("status", "parity")
    return Route(LLAMACPP, path.resolve()), any(export.parity_passed for export in exports)


def _data_path(stored: str) -> Path:
    return (Path(settings.TUNA_DATA_DIR) / stored).resolve()  # an absolute stored path stays as it is


def _how_to_export(base_model: str, job: TrainingJob | None) -> str:
    forced = "TUNA_SERVING_ENGINE=llamacpp serves models from their GGUF export"
    if job is not None:
        return (
            f"{job.model_id} has no GGUF export yet ({forced}). Export it first: the Export button on its job page "
            f'(/training/{job.pk}) or POST /api/training/{job.pk}/export with {{"formats": ["gguf_f16"]}}, '
            "then call it again once the export has completed."
        )
    return (
        f"The base model {base_model} has not been converted to GGUF yet ({forced}). Export any completed fine-tune "
        "of it (the Export button on its job page, or POST /api/training/{id}/export): the first export converts its base model."
    )
