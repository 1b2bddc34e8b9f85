"""The in-process model registry: each base model loaded once per process, LoRA adapters by name."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuna_llm.catalog import BaseModelSpec, get_base_model_spec
from tuna_llm.loading import DevicePlan, load_tokenizer_and_model, pick_device
from tuna_llm.serving import packing, rowwise
from tuna_llm.settings import current

logger = logging.getLogger("tuna.models")


class LoadedBaseModel:
    """One base model's tokenizer and weights, plus the LoRA adapters attached to them.

    There is a single copy of the base weights; adapters are switched on and off around it.
    ``lock`` serialises use of the weights (an adapter switch must not happen mid-generation).
    """

    def __init__(self, spec: BaseModelSpec, plan: DevicePlan, tokenizer: Any, model: Any, *, pack: bool | None = None) -> None:
        self.spec = spec
        self.plan = plan
        self.tokenizer = tokenizer
        self.model = model
        self.adapters: OrderedDict[str, Path] = OrderedDict()
        self.lock = threading.RLock()
        # Whether the adapter layers are switched on (True) or off (False) now; None when not known (after an
        # attach or a detach). peft's on/off switch walks every module of the model, which a decoding step would
        # otherwise pay for on every token; it runs only when the switch changes.
        self._layers_on: bool | None = None
        # ``pack``: None for torch's own linear layers; otherwise the serving layers of tuna_llm.serving.packing (row-stable
        # products), their weights packed or not. ``lone_rows_exact``: every linear layer, the adapters' included,
        # computes a lone row as it computes it in a batch, so decoding need not hold a lone row twice
        # (tuna_llm.serving.decoding).
        self.pack = pack
        self.lone_rows_exact = False
        self._prepare_layers()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> str:
        return self.plan.device

    @property
    def base_model(self) -> Any:
        """The underlying transformers model, whether or not adapters wrap it."""
        return self.model.get_base_model() if self.adapters else self.model

    def attach_adapter(self, adapter_name: str, path: Path | str) -> None:
        """Attach (or touch) an adapter; beyond TUNA_ADAPTER_CACHE_SIZE the least recently used goes."""
        from peft import PeftModel

        path = Path(path)
        with self.lock:
            if adapter_name in self.adapters:
                if self.adapters[adapter_name] == path:
                    self.adapters.move_to_end(adapter_name)
                    return
                self.detach_adapter(adapter_name)  # same name, new files: never serve stale weights
            while len(self.adapters) >= max(1, current().adapter_cache_size):
                self.detach_adapter(next(iter(self.adapters)))
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter_name)
            else:
                self.model.load_adapter(str(path), adapter_name=adapter_name)
            self.model.eval()
            self.adapters[adapter_name] = path  # peft holds it now: listed before anything else can fail
            self._layers_on = None
            self._prepare_layers()  # the new LoRA layers row-stable too
            logger.info("Attached adapter %s to %s", adapter_name, self.name)

    def detach_adapter(self, adapter_name: str) -> None:
        with self.lock:
            if adapter_name not in self.adapters:
                return
            if len(self.adapters) == 1:
                # Remove the LoRA layers without merging: the base weights stay untouched.
                self.model = self.model.unload()
            else:
                if adapter_name in self.model.active_adapters:
                    other = next(name for name in self.adapters if name != adapter_name)
                    self.model.set_adapter(other)
                self.model.delete_adapter(adapter_name)
            del self.adapters[adapter_name]
            self._layers_on = None
            self._prepare_layers()
            logger.info("Detached adapter %s from %s", adapter_name, self.name)

    def _prepare_layers(self) -> None:
        if self.pack is not None:
            self.lone_rows_exact = False  # until every product is known to be row-stable again
            packing.prepare_linear_layers(self.model, pack=self.pack)
            self.lone_rows_exact = packing.products_row_stable(self.model)

    @contextlib.contextmanager
    def using(self, adapter_name: str | None) -> Iterator[Any]:
        """Hold the weights with ``adapter_name`` switched on, or with every adapter off for None."""
        with self.lock:
            if adapter_name is None:
                if self.adapters:
                    self._switch_layers(False)
                yield self.model
                return
            if adapter_name not in self.adapters:
                raise KeyError(f"Adapter {adapter_name!r} is not attached to {self.name}.")
            self.adapters.move_to_end(adapter_name)
            self._switch_layers(True)
            if self.model.active_adapter != adapter_name:  # peft's record of it: reading it walks nothing
                self.model.set_adapter(adapter_name)
            yield self.model

    def _switch_layers(self, on: bool) -> None:
        """Turn every adapter's layers on or off (off: the base model), unless they already are."""
        if self._layers_on is not on:
            if on:
                self.model.base_model.enable_adapter_layers()
            else:
                self.model.base_model.disable_adapter_layers()
            self._layers_on = on

    @contextlib.contextmanager
    def using_per_row(self, row_adapters: list[str | None]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """Hold the weights for a batch whose rows may each use a different adapter (None: the base).

        Yields the model and the extra ``generate`` arguments: nothing when every row uses the same
        adapter, otherwise peft's ``adapter_names``, which routes each row through its own LoRA weights.
        """
        distinct = set(row_adapters)
        if len(distinct) == 1:
            with self.using(row_adapters[0]) as model:
                yield model, {}
            return
        with self.lock:
            missing = sorted(name for name in distinct - {None} if name not in self.adapters)
            if missing:
                raise KeyError(f"Adapters {missing} are not attached to {self.name}.")
            for name in distinct - {None}:
                self.adapters.move_to_end(name)
            self._switch_layers(True)  # each row through its own adapter (or none: "__base__")
            yield self.model, {"adapter_names": [name or "__base__" for name in row_adapters]}


def load_for_serving(spec: BaseModelSpec, plan: DevicePlan, *, hf_token: str | None = None, pack: bool | None = None) -> LoadedBaseModel:
    """A base model loaded for evaluation and serving: each answer computed as if alone, whatever it is
    batched with (row-wise attention: tuna_llm.serving.rowwise; on CPU, in fp32 or native bf16, row-stable linear layers
    on oneDNN, their weights packed for it: tuna_llm.serving.packing; ``pack`` None: the TUNA_PACK_WEIGHTS setting)."""
    tokenizer, model = load_tokenizer_and_model(spec, plan, hf_token=hf_token, attention=rowwise.register())
    if pack is None:
        pack = _configured_packing()
    if not packing.applies(plan):
        return LoadedBaseModel(spec, plan, tokenizer, model)
    loaded = LoadedBaseModel(spec, plan, tokenizer, model, pack=pack)
    count = sum(isinstance(module, packing.serving_linear_class()) for module in model.modules())
    logger.info("%d linear layers of %s made row-stable%s for the CPU's oneDNN kernels", count, spec.name, ", packed," if pack else "")
    return loaded


def _configured_packing() -> bool:
    try:
        return current().pack_weights
    except RuntimeError:  # not configured (a script using the model layer alone)
        return True


class ModelRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedBaseModel] = {}

    def get(self, name: str | None = None) -> LoadedBaseModel:
        spec = get_base_model_spec(name)
        with self._lock:
            loaded = self._loaded.get(spec.name)
            if loaded is None:
                plan = pick_device()
                loaded = load_for_serving(spec, plan, hf_token=current().hf_token)
                self._loaded[spec.name] = loaded
            return loaded

    def get_on(self, thread, name: str | None = None) -> LoadedBaseModel:
        """``get``, with a first load run on ``thread`` (a ComputeThread): a serving process keeps its torch
        work on one thread (tuna_llm.serving.compute). An already loaded model is returned at once."""
        spec = get_base_model_spec(name)
        with self._lock:
            loaded = self._loaded.get(spec.name)
        return loaded if loaded is not None else thread.call(lambda: self.get(spec.name))

    def clear(self) -> None:
        """Forget the loaded models (the next ``get`` loads again, e.g. after the precision setting changed)."""
        with self._lock:
            self._loaded.clear()


registry = ModelRegistry()
