"""The few settings the model layer needs, handed in by whoever runs it (the Django site, a script).

The site registers a provider once (``configure``); every read calls it, so a changed setting (a test's
override, an operator's reload) is seen at once and nothing here imports Django.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LlmSettings:
    base_models: dict[str, str]  # catalog name -> "embedded:...", a hub id or a local directory
    default_base_model: str
    model_cache_dir: Path
    adapter_cache_size: int = 8
    hf_token: str | None = None
    precision: str = "auto"  # "auto" (bf16 where the hardware has it natively), "bf16" or "fp32"
    pack_weights: bool = True  # on CPU (fp32, native bf16): serving weights packed for oneDNN (tuna_llm.serving.packing)
    llama_server_bin: str = ""  # llama-server's path ("": the environment's bin/llama-server, built by `make install`)
    llama_server_parallel: int = 8  # llama-server's parallel slots (continuous batching)
    extra: dict = field(default_factory=dict)


_provider: Callable[[], LlmSettings] | None = None


def configure(provider: Callable[[], LlmSettings]) -> None:
    global _provider
    _provider = provider


def current() -> LlmSettings:
    if _provider is None:
        raise RuntimeError("tuna_llm is not configured: call tuna_llm.settings.configure(provider) first.")
    return _provider()
