"""What a run or an export will write, estimated before it starts (for the storage quota and the disk's free space).

Pure arithmetic on a base model's config.json and the sizes of its files: nothing is loaded, nothing is downloaded.
A model whose files are not on this server yet (a hub model not prepared) gives None: the caller then checks only
what it knows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuna_llm.autoconfig import estimate_parameters

FP32_BYTES = 4
# A kept checkpoint holds the adapter's weights and Adam's two moments (all fp32): three times the adapter.
CHECKPOINT_COPIES = 3
# Files an adapter folder copies from the base (the tokenizer, so the folder loads alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "special_tokens_map.json")
# Bytes per parameter of a GGUF file by its type. The K-quants: rounded up from what llama-quantize wrote for the
# embedded model, whose rows do not divide into K-quant blocks (docs/performance.md, issue 33's export); a model whose
# rows divide gets smaller files, so larger models are overestimated, never under.
GGUF_BYTES_PER_PARAMETER = {"f16": 2.0, "q8_0": 1.07, "q5_k_m": 0.85, "q4_k_m": 0.8, "q4": 0.6}
MERGED, GGUF_F16, GGUF_Q8_0 = "merged_safetensors", "gguf_f16", "gguf_q8_0"
GGUF_QUANTIZED = {"gguf_q5_k_m": "q5_k_m", "gguf_q4_k_m": "q4_k_m"}  # made by llama-quantize from a merged f16 GGUF


def read_config(model_dir: str | Path | None) -> dict[str, Any] | None:
    """The model's config.json, or None when it is not on this server (yet)."""
    if not model_dir:
        return None
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def module_shape(config: dict[str, Any], module: str) -> tuple[int, int]:
    """(in_features, out_features) of one of a decoder layer's linear modules, from the model's sizes."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return shapes.get(module, (hidden, hidden))  # a module named otherwise: counted as a square one


def lora_parameters(config: dict[str, Any], *, r: int, target_modules: Iterable[str]) -> int:
    """A LoRA adapter's parameters: r x (in + out) per target module, per layer."""
    layers = int(config["num_hidden_layers"])
    return layers * sum(r * sum(module_shape(config, module)) for module in target_modules)


def run_bytes(adapter_bytes: int, *, kept_checkpoints: int, extra_bytes: int = 0) -> int:
    """A run's files: the adapter (with `extra_bytes` of files it copies) and its kept checkpoints (3 x the adapter)."""
    return adapter_bytes * (1 + max(0, kept_checkpoints) * CHECKPOINT_COPIES) + extra_bytes


def export_bytes(formats: Iterable[str], *, weight_bytes: int, parameters: int, adapter_bytes: int) -> int:
    """What an export keeps in the job's folder, by format: merged safetensors ~ the base's weights; gguf_f16 the adapter
    as an f16 LoRA GGUF (half its fp32 safetensors; the base's f16 GGUF is shared, see `shared_export_bytes`); gguf_q8_0
    the merged model in q8_0 (1.07 bytes a parameter); gguf_q5_k_m / gguf_q4_k_m the merged model quantized (0.85 / 0.8)."""
    formats = set(formats)
    total = weight_bytes if MERGED in formats else 0
    total += adapter_bytes / 2 if GGUF_F16 in formats else 0
    total += parameters * GGUF_BYTES_PER_PARAMETER["q8_0"] if GGUF_Q8_0 in formats else 0
    total += sum(parameters * GGUF_BYTES_PER_PARAMETER[outtype] for name, outtype in GGUF_QUANTIZED.items() if name in formats)
    return int(total)


def shared_export_bytes(formats: Iterable[str], *, weight_bytes: int, parameters: int, converted: Iterable[str] = ()) -> int:
    """What an export writes besides the job's folder: the base's GGUF conversions not on the server yet (`converted`:
    the types already there; written once per base, shared by every export), the merged weights an export of merged
    GGUFs without merged_safetensors writes while it runs, and the merged f16 GGUF the K-quants are made from."""
    formats, converted = set(formats), set(converted)
    total = 0.0
    for name, outtype in ((GGUF_F16, "f16"), (GGUF_Q8_0, "q8_0")):
        if name in formats and outtype not in converted:
            total += parameters * GGUF_BYTES_PER_PARAMETER[outtype]
    quantized = any(name in formats for name in GGUF_QUANTIZED)
    if (GGUF_Q8_0 in formats or quantized) and MERGED not in formats:
        total += weight_bytes
    if quantized:
        total += parameters * GGUF_BYTES_PER_PARAMETER["f16"]  # the merged f16 GGUF llama-quantize reads, removed after
    return int(total)


# -- read from a model's folder ---------------------------------------------------------------------
def _file_bytes(model_dir: Path, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        try:
            total += (model_dir / name).stat().st_size
        except OSError:
            pass
    return total


def run_estimate(model_dir: str | Path | None, *, r: int, target_modules: Iterable[str], kept_checkpoints: int) -> int | None:
    """Bytes a LoRA run on the model in `model_dir` will write (None: the model's config is not here)."""
    config = read_config(model_dir)
    if config is None:
        return None
    try:
        adapter = lora_parameters(config, r=r, target_modules=target_modules) * FP32_BYTES
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return run_bytes(adapter, kept_checkpoints=kept_checkpoints, extra_bytes=_file_bytes(Path(model_dir), TOKENIZER_FILES))


def weight_bytes(model_dir: str | Path | None) -> int | None:
    """The size of the model's safetensors files (None when there are none here)."""
    if not model_dir:
        return None
    files = list(Path(model_dir).glob("*.safetensors"))
    return _file_bytes(Path(model_dir), [f.name for f in files]) if files else None


def export_estimate(
    model_dir: str | Path | None, formats: Iterable[str], *, adapter_dir: str | Path | None, converted: Iterable[str] = ()
) -> tuple[int, int] | None:
    """(bytes the job's folder will keep, bytes written elsewhere) for an export of the adapter in `adapter_dir`, a
    fine-tune of the model in `model_dir`; None when the model's files are not here."""
    config, weights = read_config(model_dir), weight_bytes(model_dir)
    parameters = estimate_parameters(config) if config else None
    if weights is None or not parameters:
        return None
    formats = list(formats)
    adapter = _file_bytes(Path(adapter_dir), ["adapter_model.safetensors"]) if adapter_dir else 0
    kept = export_bytes(formats, weight_bytes=weights, parameters=parameters, adapter_bytes=adapter)
    return kept, shared_export_bytes(formats, weight_bytes=weights, parameters=parameters, converted=converted)
