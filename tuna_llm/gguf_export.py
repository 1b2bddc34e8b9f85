"""Exports of a fine-tune: merged weights, and GGUF files made by the pinned llama.cpp's own converter and quantizer.

The converter scripts come from the same source distribution as the llama-cpp-python runtime
(tools/install_llama_cpp.py copies them to <prefix>/share/llama.cpp-converter-<version>), so a GGUF is
always written by the converter of the llama.cpp that runs it; the K-quant files (Q4_K_M, Q5_K_M) are made from
an f16 GGUF by llama-quantize of the same source (tuna_llm.llama_tools). Conversions run offline
(HF_HUB_OFFLINE=1): everything they read is on disk. Every file is written under a ".partial" name and
renamed once whole, so a failed or killed conversion never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from tuna_llm import llama_tools
from tuna_llm.catalog import BaseModelSpec
from tuna_llm.loading import DevicePlan, load_tokenizer_and_model
from tuna_llm.prompting import chat_template_for
from tuna_llm.training import save_tokenizer

CONVERTER_DIR_ENV = "TUNA_LLAMA_CPP_CONVERTER_DIR"
PARTIAL = ".partial"
# llama-quantize's types offered by the export (the ones Ollama's library ships most).
QUANTIZATIONS = ("Q4_K_M", "Q5_K_M")
# llama-quantize's line for a tensor whose rows do not divide into K-quant blocks of 256 (SmolLM2's rows are 576
# wide): "warning: blk.0.attn_k.weight - ncols 576 not divisible by 256 (required for type q4_K) -> falling back to q5_0"
_FALLBACK = re.compile(r"ncols\s+(\d+) not divisible by \d+ \(required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)")
_TENSORS = re.compile(r"loaded meta data with \d+ key-value pairs and (\d+) tensors")


class ConversionFailed(RuntimeError):
    """The converter refused or crashed; the message ends with what it printed last."""


def llama_cpp_version() -> str | None:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def converter_dir() -> Path:
    """Where the pinned release's converter scripts are (TUNA_LLAMA_CPP_CONVERTER_DIR overrides)."""
    override = os.environ.get(CONVERTER_DIR_ENV)
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / f"llama.cpp-converter-{llama_cpp_version()}"


def export_unavailable() -> str | None:
    """Why exports cannot run here (None when they can)."""
    if llama_cpp_version() is None:
        return "llama.cpp is not installed: run `make install` (or python tools/install_llama_cpp.py)."
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return f"The llama.cpp converter is missing from {converter_dir()}: run python tools/install_llama_cpp.py."
    return None


# A bound far above any real run (an 8B model quantizes in minutes), so that a hung llama-quantize ends its export.
QUANTIZE_TIMEOUT_S = 4 * 3600


def quantize_unavailable() -> str | None:
    """Why the K-quant exports cannot run here (None when they can)."""
    try:
        llama_tools.binary(llama_tools.QUANTIZE)
    except llama_tools.LlamaToolMissing as exc:
        return str(exc)
    return None


def quantize(source: Path, out: Path, qtype: str, threads: int | None = None) -> dict[str, Any]:
    """An f16 GGUF quantized by llama-quantize to `qtype` (one of QUANTIZATIONS), written whole or not at all.
    Returns what llama-quantize did: {"type", "tensors" (in all), "fallbacks": {"q4_K -> q5_0": tensors kept at a
    wider type because their rows do not divide into K-quant blocks}, "fallback_widths": those rows' widths,
    "size_bytes"}."""
    if qtype not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {qtype!r}; choose from {', '.join(QUANTIZATIONS)}.")
    program = llama_tools.binary(llama_tools.QUANTIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(out)
    partial.unlink(missing_ok=True)
    command = [str(program), str(source), str(partial), qtype, str(threads or os.cpu_count() or 1)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QUANTIZE_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # run() has killed it: a hung program never holds the export forever
        partial.unlink(missing_ok=True)
        raise ConversionFailed(
            f"llama-quantize {qtype} did not finish within {QUANTIZE_TIMEOUT_S // 3600} hours; it was stopped."
        ) from None
    said = (result.stdout or "") + (result.stderr or "")
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        lines = [line for line in said.strip().splitlines() if line.strip()]
        raise ConversionFailed(f"llama-quantize {qtype} failed (exit {result.returncode}): {' | '.join(lines[-3:])[:600] or 'no output'}")
    os.replace(partial, out)
    fallbacks: dict[str, int] = {}
    widths: set[int] = set()
    for width, wanted, used in _FALLBACK.findall(said):
        fallbacks[f"{wanted} -> {used}"] = fallbacks.get(f"{wanted} -> {used}", 0) + 1
        widths.add(int(width))
    tensors = _TENSORS.search(said)
    return {
        "type": qtype,
        "tensors": int(tensors.group(1)) if tensors else None,
        "fallbacks": fallbacks,
        "fallback_widths": sorted(widths),
        "size_bytes": out.stat().st_size,
    }


def _partial(path: Path) -> Path:
    """Where `path` is written before it is whole (per process: two workers may convert one base at once)."""
    return path.with_name(f"{path.name}.{os.getpid()}{PARTIAL}")


def _convert(script: str, args: list[str], out: Path) -> Path:
    missing = export_unavailable()
    if missing:
        raise ConversionFailed(missing)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(out)
    partial.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, not ours
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, str(converter_dir() / script), *args, "--outfile", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        said = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        raise ConversionFailed(f"{script} failed (exit {result.returncode}): {' | '.join(said[-3:])[:600] or 'no output'}")
    os.replace(partial, out)
    return out


def convert_model(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """A Hugging Face model folder (safetensors, config, tokenizer, chat template) as one GGUF file, whose chat
    template is the one a fine-tune of it is trained and saved with (tuna_llm.prompting.chat_template_for)."""
    with with_chat_template(model_dir) as source:
        return _convert("convert_hf_to_gguf.py", [str(source), "--outtype", outtype], out)


@contextmanager
def with_chat_template(model_dir: Path) -> Iterator[Path]:
    """The model folder as the converter should read it: the folder itself when its chat template is already
    ``chat_template_for`` its tokenizer, else a temporary folder of links to its files with that template written
    into tokenizer_config.json and chat_template.jinja (the converter reads the first, then the second)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    config_file = model_dir / "tokenizer_config.json"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    template = chat_template_for(tokenizer)
    if not template or not config_file.is_file() or template == tokenizer.chat_template:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="tuna-convert-") as temporary:
        staged = Path(temporary) / model_dir.name  # the converter names the model after its folder
        staged.mkdir()
        for item in model_dir.iterdir():
            if item.name not in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
                (staged / item.name).symlink_to(item.resolve())
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["chat_template"] = template
        (staged / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (staged / "chat_template.jinja").write_text(template, encoding="utf-8")
        yield staged


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """A PEFT LoRA adapter as a LoRA GGUF, applied at run time on the base GGUF."""
    return _convert("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outtype", outtype, str(adapter_dir)], out)


def merge_adapter(spec: BaseModelSpec, plan: DevicePlan, adapter_dir: Path, out_dir: Path, hf_token: str | None = None) -> Path:
    """Base + LoRA merged into plain weights (safetensors) with the tokenizer and the chat template the fine-tune
    was trained with (training.save_tokenizer): loadable by transformers and vLLM without peft."""
    from peft import PeftModel

    tokenizer, model = load_tokenizer_and_model(spec, plan, hf_token=hf_token)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    partial = _partial(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(str(partial), safe_serialization=True)
    save_tokenizer(tokenizer, partial)
    _keep_generation_config(merged, partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    return out_dir


def _keep_generation_config(model: Any, folder: Path) -> None:
    if getattr(model, "generation_config", None) is not None and not (folder / "generation_config.json").exists():
        model.generation_config.save_pretrained(str(folder))


def remove_partials(folder: Path) -> None:
    """Remove what a killed export left half-written (files and folders named *.partial)."""
    for leftover in folder.rglob(f"*{PARTIAL}"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
