"""Remote engines by URL (TUNA_REMOTE_ENGINES: vLLM, SGLang, a llama-server someone else runs), one per base model.

- Start-up: the configuration is checked (a system check, ``tuna.E330``) with one error per problem.
- Routing (``route``, called by inference_app.engines.engine_for, the one place that picks an engine):
  TUNA_SERVING_ENGINE=remote serves every model whose base has a remote engine through it; ``auto`` serves a
  fine-tune through it only once an engine check of that fine-tune on that engine passed, and a base model once a
  check of any of its fine-tunes did (the check ran the very base weights the engine serves). A kept checkpoint is
  never remote (its PEFT folder is served by transformers).
- The engine check (an ``EngineCheck`` row the worker runs): the fine-tune's held-out prompts, greedy, through
  transformers + peft (the weights as trained and evaluated) and through the remote engine, one prompt at a time,
  counted with tuna_llm.parity.parity_report; passed at Export.PARITY_PASS of identical answers.
- Errors: an engine that cannot be reached is a 503 with Retry-After; an adapter the engine cannot load (or a
  llama-server not started with it) is a 409 saying what to do; the engine's own 4xx is a 400 with its message
  (tuna_llm.serving.openai_engine).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from django.conf import settings
from django.core import checks
from django.db import transaction

from inference_app.models import EngineCheck
from training_app.models import TrainingJob
from tuna_core.errors import Conflict
from tuna_core.jobs import job_complete, job_enqueue, job_write
from tuna_core.quotas import check_active_jobs
from tuna_llm.catalog import get_base_model_spec, get_catalog
from tuna_llm.serving.engine import Adapter, CallSpec, Engine, result_of
from tuna_llm.serving.openai_engine import EngineRefused, EngineUnavailable, OpenAIEngine
from tuna_llm.serving.remote import (
    LLAMA_SERVER,
    AdapterUnknown,
    Health,
    RemoteEngineConfig,
    adapter_path,
    config_problems,
    health,
    load_prompts,
    local_relative,
    parse_engines,
    remote_engine,
)

logger = logging.getLogger("tuna.remote")

REMOTE_MODES = ("remote", "auto")
CHECK_ID = "tuna.E330"


class RemoteAdapterMissing(Conflict):
    """The remote engine cannot apply this fine-tune (yet); the message says what to do."""

    code = "adapter_not_loaded"


class EngineCheckRefused(Conflict):
    code = "engine_check_refused"


# -- configuration -------------------------------------------------------------------------------------


def configured() -> dict[str, RemoteEngineConfig]:
    """TUNA_REMOTE_ENGINES by base model (checked at start-up; read at each call, so a changed setting is seen)."""
    raw = settings.TUNA_REMOTE_ENGINES
    return parse_engines(raw, get_catalog(), os.environ) if raw else {}


def config_for(base_model: str) -> RemoteEngineConfig | None:
    return configured().get(base_model)


@checks.register("tuna")
def check_remote_engines(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    problems = config_problems(settings.TUNA_REMOTE_ENGINES, get_catalog(), os.environ)
    hint = 'A JSON object, e.g. {"llama-3.1-8b": {"kind": "vllm", "url": "http://gpu-1:8000", "model": "meta-llama/Llama-3.1-8B-Instruct"}}; see docs/export-and-serving.md, "Remote engines".'
    return [checks.Error(f"TUNA_REMOTE_ENGINES: {problem}.", hint=hint, id=CHECK_ID) for problem in problems]


# -- this process's engines --------------------------------------------------------------------------

_engines: dict[str, tuple[tuple[RemoteEngineConfig, str | None], OpenAIEngine]] = {}
_engines_lock = threading.Lock()


def engine_of(config: RemoteEngineConfig) -> OpenAIEngine:
    """This process's client of ``config``'s engine (built on first use: it loads the base model's tokenizer).
    NotServable (409) when that tokenizer cannot be loaded; the details (paths, the hub's answer) go to the log."""
    with _engines_lock:
        held = _engines.get(config.base_model)
        wanted = (config, config.api_key())  # a changed configuration or key makes a new client
        if held is not None and held[0] == wanted:
            return held[1]
        spec = get_base_model_spec(config.base_model)
        try:
            if spec.kind == "embedded":
                from tuna_llm.loading import prepare_embedded_model

                prepare_embedded_model(spec)
            prompts = load_prompts(spec.load_path, hub=spec.kind == "hub", hf_token=settings.HF_TOKEN, context=config.context)
        except (OSError, ValueError) as exc:  # files missing or unreadable, the hub unreachable, no tokenizer there
            from inference_app.engines import NotServable  # (engines calls this module)

            logger.warning("The tokenizer of %s for its %s engine could not be loaded: %s", config.base_model, config.kind, exc)
            raise NotServable(
                f"The {config.kind} engine serves {config.base_model}, but this server could not load that base model's "
                f"tokenizer ({type(exc).__name__}), which renders and counts the prompts it sends: check that the base "
                "model is downloaded or reachable (its state on the models page; the server log has the details)."
            ) from None
        engine = remote_engine(config, prompts)
        if held is not None:
            held[1].close()
        _engines[config.base_model] = (wanted, engine)
        return engine


def engine_health(base_model: str) -> Health | None:
    """The remote engine's health for a page or the API (None: the base model has no remote engine)."""
    config = config_for(base_model)
    return health(config) if config is not None else None


# -- routing -------------------------------------------------------------------------------------------


def route(*, base_model: str, job: TrainingJob | None, mode: str, checkpoint: bool = False) -> tuple[Engine, Adapter | None] | None:
    """The remote engine and the adapter it applies, when this call goes to a remote engine; None otherwise (the
    caller routes it as before). NotServable (409, saying what to do) for an adapter the engine cannot take; an
    engine that is down is met by the call itself (EngineUnavailable: 503 with Retry-After)."""
    if mode not in REMOTE_MODES or checkpoint:
        return None
    config = config_for(base_model)
    if config is None:
        return None
    if mode == "auto" and not (job_passed(config, job) if job is not None else base_passed(config)):
        return None
    from inference_app.engines import NotServable  # (engines calls this module)

    engine = engine_of(config)
    try:
        adapter = adapter_for(config, job) if job is not None else None
        if adapter is not None:
            engine.adapters.prepare(adapter)
    except (RemoteAdapterMissing, AdapterUnknown) as exc:  # 409 (and a refused call in the usage log)
        raise NotServable(str(exc)) from None
    except (EngineUnavailable, EngineRefused):
        pass  # the call goes on and meets the same answer, as every engine's failure does: 503 with Retry-After
    return engine, adapter


def adapter_for(config: RemoteEngineConfig, job: TrainingJob) -> Adapter:
    """The fine-tune as the engine names and finds it: its PEFT folder (vLLM, SGLang) or its exported LoRA GGUF
    (llama-server), as a path under the jobs folder seen from the engine (adapter_root)."""
    name = f"job-{job.pk}"
    if config.kind == LLAMA_SERVER:
        from training_app.exports import serving_export

        export = serving_export(job)
        if export is None:
            raise RemoteAdapterMissing(
                f"{job.model_id} is served by the llama-server at {config.url}, which applies LoRA GGUF files: export it first "
                f'(the Export button on its job page, or POST /api/training/{job.pk}/export with {{"formats": ["gguf_f16"]}}), '
                "then restart that llama-server with the export's adapter-f16.gguf among its --lora files."
            )
        local = Path(settings.TUNA_DATA_DIR) / export.file("gguf_lora")["path"]
    else:
        local = Path(job.adapter_dir)
    return Adapter(name, _engine_side(config, local))


def _engine_side(config: RemoteEngineConfig, local: Path) -> str:
    jobs = Path(settings.TUNA_DATA_DIR) / "jobs"
    try:
        relative = local_relative(local, jobs)
    except ValueError:  # not under the jobs folder (an adapter made elsewhere): the engine must read this very path
        return str(local.resolve())
    return adapter_path(config, relative)


def job_passed(config: RemoteEngineConfig, job: TrainingJob) -> bool:
    """The newest finished check of this fine-tune on this engine passed."""
    latest = (
        EngineCheck.objects.filter(training_job=job, engine_key=config.key, status=EngineCheck.Status.COMPLETED)
        .order_by("-completed_at", "-id")
        .first()
    )
    return latest is not None and latest.passed


def base_passed(config: RemoteEngineConfig) -> bool:
    """Some fine-tune of the base passed its newest check on this engine (that check ran the engine's base weights)."""
    newest: dict[int, EngineCheck] = {}
    rows = EngineCheck.objects.filter(base_model=config.base_model, engine_key=config.key, status=EngineCheck.Status.COMPLETED)
    for check in rows.order_by("completed_at", "id"):
        newest[check.training_job_id] = check
    return any(check.passed for check in newest.values())


# -- the engine check ----------------------------------------------------------------------------------


def engine_check_start(*, owner, job: TrainingJob) -> EngineCheck:
    """Queue a check of a completed fine-tune on its base's remote engine (one already queued or running is returned)."""
    config = config_for(job.base_model)
    if config is None:
        raise EngineCheckRefused(f"No remote engine is configured for the base model {job.base_model} (TUNA_REMOTE_ENGINES).")
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().get(pk=job.pk)
        if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
            raise EngineCheckRefused(f"Only a completed fine-tune can be checked; job #{job.pk} is {job.get_status_display().lower()}.")
        active = job.engine_checks.filter(status__in=[EngineCheck.Status.QUEUED, EngineCheck.Status.RUNNING]).first()
        if active is not None:
            return active
        adapter_for(config, job)  # a llama-server needs the job's export: refused now rather than failed later
        check_active_jobs(owner)
        check = EngineCheck.objects.create(
            owner=owner, training_job=job, base_model=job.base_model, engine_key=config.key, engine_kind=config.kind
        )
        job_enqueue(check)
    logger.info("Engine check %s of job %s on %s queued by %s", check.pk, job.pk, config.key, owner)
    return check


def engine_check_work(check: EngineCheck) -> None:
    """The worker's work for a claimed check: transformers' answers, then the engine's, compared."""
    from datasets_app.examples import held_out_examples
    from tuna_llm.evaluation import decoding_budget
    from tuna_llm.loading import load_tokenizer_and_model, pick_device
    from tuna_llm.parity import parity_report, pytorch_answers
    from tuna_llm.prompting import answer_text
    from tuna_llm.serving.registry import LoadedBaseModel

    job = check.training_job
    config = config_for(job.base_model)
    if config is None or config.key != check.engine_key:
        raise RuntimeError(
            f"The remote engine of {job.base_model} changed since the check was queued ({check.engine_key}); start it again."
        )
    examples = held_out_examples(job.dataset)[: settings.TUNA_PARITY_EXAMPLES]
    if not examples:
        raise RuntimeError(f"Job #{job.pk}'s dataset has no held-out examples to compare the engine's answers on.")
    job_write(EngineCheck, check.pk, total=len(examples), done=0)
    adapter = adapter_for(config, job)
    engine = engine_of(config)
    engine.adapters.forget(adapter.name)  # asked of the engine itself, not this process's memory of it
    try:
        engine.adapters.prepare(adapter)  # before the long part: an engine that cannot load it fails the check at once
    except AdapterUnknown as exc:
        raise RuntimeError(str(exc)) from None

    # The weights as trained: fp32 against a GGUF (as the export's parity check), the deployment's precision against
    # vLLM / SGLang (what transformers serving computes in).
    spec = get_base_model_spec(job.base_model)
    plan = pick_device("fp32" if config.kind == LLAMA_SERVER else None)
    loaded = LoadedBaseModel(spec, plan, *load_tokenizer_and_model(spec, plan, hf_token=settings.HF_TOKEN))
    name = f"job-{job.pk}"
    loaded.attach_adapter(name, job.adapter_dir)
    budget = decoding_budget(loaded, [answer_text(messages[-1]) for messages in examples])
    torch_answers = pytorch_answers(loaded, examples, name, budget)
    del loaded

    answers = []
    for index, messages in enumerate(examples):
        request = engine.prepare(CallSpec(messages=messages[:-1], max_tokens=budget, temperature=0.0, adapter=adapter))
        answers.append(result_of(engine.submit(request)))
        job_write(EngineCheck, check.pk, done=index + 1)
    report = parity_report(examples, torch_answers, answers, label=config.key)
    job_complete(check, identical=report["identical"], total=report["total"], report=report)
    logger.info("Engine check %s of job %s on %s: %s of %s identical", check.pk, job.pk, config.key, report["identical"], report["total"])
