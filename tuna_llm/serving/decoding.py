"""Step-wise decoding over one shared KV cache, with rows joining and leaving between steps.

``model.generate`` decodes a fixed batch to its end: a request that arrives meanwhile waits for the whole
batch. ``DecodeBatch`` lives across steps instead. ``admit`` prefills new rows (left-padded, each through
its own adapter) and splices their keys and values into the running cache, ``step`` decodes one token for
every row, ``drop`` removes the rows that ended. Rows stay right-aligned: each row's newest token is the
last column, shorter rows carry masked padding on the left, and the padding every row shares is cut off
when rows leave.

Why not transformers' own continuous batching (``generate_batch`` and its manager): it schedules on a paged
cache of the bare model and has no notion of peft's per-row adapters, which the mixed base / fine-tuned
batches here need.

Greedy rows take the arg-max; sampling rows draw with their own ``torch.Generator`` (seeded when the
request has a seed), so a seeded answer does not depend on what else is in the batch. Splicing needs plain
growing caches (full attention on every layer, as Llama and SmolLM2 have); for a model with sliding-window
layers ``can_join`` is False and new rows wait until the batch is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuna_llm.serving.registry import LoadedBaseModel


@dataclass(eq=False)
class Row:
    """One sequence being decoded: its prompt's token ids and how to pick its tokens."""

    prompt_ids: list[int]
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: Any = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class DecodeBatch:
    """The running rows and their cache. The tensors hold one slot per row, except that a batch of one row
    holds it twice (a "ghost" copy) where the model's linear layers are torch's own: a single row would go
    through the matrix-vector kernels, which round differently from the matrix kernels a batch uses
    (tuna_llm.serving.rowwise), so a lone answer would not be the one it gets in a batch (in fp32 too: a last-digit
    difference in the logits is enough to flip a near-tie). The serving layers of tuna_llm.serving.packing (on CPU)
    make that copy inside each product instead (``LoadedBaseModel.lone_rows_exact``), so there a lone row is held
    once and the rest of a step (attention, norms, the cache) is not done twice."""

    def __init__(self, loaded: LoadedBaseModel, pad_token_id: int) -> None:
        self.loaded = loaded
        self.pad_token_id = pad_token_id
        self.slots: list[Row] = []  # the tensors' rows: each row once, or a lone row twice
        self.cache: Any = None  # transformers' DynamicCache: [slots, heads, columns, head_dim] per layer
        self.mask: Any = None  # [slots, columns]: 1 where a column holds one of the row's tokens
        self.lengths: Any = None  # [slots]: real tokens per slot (the next token's position)
        self.can_join = True

    @property
    def rows(self) -> list[Row]:
        return list(dict.fromkeys(self.slots))

    def __len__(self) -> int:
        return len(self.rows)

    # -- rows in and out ----------------------------------------------------------------------
    def admit(self, rows: list[Row]) -> list[int]:
        """Prefill ``rows`` together and add them to the batch; returns each one's first new token."""
        import torch

        device = self.loaded.device
        slots = rows * 2 if len(rows) == 1 and self._ghost else list(rows)
        width = max(len(row.prompt_ids) for row in slots)
        ids = torch.full((len(slots), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(slots), width), dtype=torch.long)
        for i, row in enumerate(slots):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[i, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(slots, input_ids=ids, attention_mask=mask, position_ids=positions, cache=None)
        lengths = mask.sum(-1)
        for row in rows:
            if not row.greedy and row.generator is None:
                row.generator = torch.Generator(device=device)
                if row.seed is not None:
                    row.generator.manual_seed(row.seed)
                else:
                    row.generator.seed()
        if not self.slots:
            self.slots, self.cache, self.mask, self.lengths = slots, cache, mask, lengths
            self.can_join = _spliceable(cache)
        else:
            self._splice(slots, cache, mask, lengths)
        self._one_slot_per_row()
        return self._choose(logits[: len(rows)], rows)

    def step(self, tokens: list[int]) -> list[int]:
        """Feed each row its last token (``tokens``, in ``rows`` order) and return the next one of each."""
        import torch

        device = self.loaded.device
        rows = self.rows
        last = dict(zip(rows, tokens, strict=True))
        ids = torch.tensor([last[row] for row in self.slots], dtype=torch.long, device=device).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones((len(self.slots), 1), dtype=self.mask.dtype, device=device)], dim=1)
        positions = self.lengths.unsqueeze(1)
        logits, self.cache = self._forward(self.slots, input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache)
        self.lengths = self.lengths + 1
        return self._choose(logits[: len(rows)], rows)  # the rows come first; a ghost copy is last

    def drop(self, rows: list[Row]) -> None:
        """Remove ``rows``; the padding columns every remaining row has on its left go too."""
        keep = [i for i, row in enumerate(self.slots) if row not in rows]
        if len(keep) == len(self.slots):
            return
        if not keep:
            self.slots, self.cache, self.mask, self.lengths = [], None, None, None
            self.can_join = True
            return
        self._select(keep)
        self._one_slot_per_row()
        shared_padding = int(self.mask.shape[1] - self.lengths.max())
        if shared_padding > 0 and self.can_join:
            self.mask = self.mask[:, shared_padding:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, shared_padding:, :]
                layer.values = layer.values[:, :, shared_padding:, :]

    @property
    def _ghost(self) -> bool:
        """Whether a lone row is held twice (see the class's docstring)."""
        return not self.loaded.lone_rows_exact

    def _one_slot_per_row(self) -> None:
        """Each row once in the tensors, rows first; a lone row twice where it needs its ghost copy (last)."""
        rows = self.rows
        first = [self.slots.index(row) for row in rows]
        wanted = first * 2 if len(rows) == 1 and self._ghost else first
        if wanted != list(range(len(self.slots))):
            self._select(wanted)

    def _select(self, index: list[int]) -> None:
        import torch

        positions = torch.tensor(index, device=self.mask.device)
        self.slots = [self.slots[i] for i in index]
        self.mask, self.lengths = self.mask[positions], self.lengths[positions]
        self.cache.batch_select_indices(positions)

    # -- internals ----------------------------------------------------------------------------
    def _forward(self, rows: list[Row], **inputs):
        import torch

        with self.loaded.using_per_row([row.adapter for row in rows]) as (model, routing), torch.inference_mode():
            out = model(**inputs, **routing, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.cache

    def _splice(self, slots: list[Row], cache: Any, mask: Any, lengths: Any) -> None:
        """Join newly prefilled rows to the running ones: left-pad the shorter side to a common width."""
        import torch
        import torch.nn.functional as F

        width = max(self.mask.shape[1], mask.shape[1])

        def pad(tensor, columns_dim: int):
            missing = width - tensor.shape[columns_dim]
            if not missing:
                return tensor
            padding = [0, 0] * (tensor.dim() - 1 - columns_dim) + [missing, 0]
            return F.pad(tensor, padding)

        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, 2), pad(new.keys, 2)], dim=0)
            old.values = torch.cat([pad(old.values, 2), pad(new.values, 2)], dim=0)
        self.mask = torch.cat([pad(self.mask, 1), pad(mask, 1)], dim=0)
        self.lengths = torch.cat([self.lengths, lengths])
        self.slots = self.slots + list(slots)

    @staticmethod
    def _choose(logits: Any, rows: list[Row]) -> list[int]:
        """Greedy rows: the arg-max. Sampling rows: temperature, then nucleus (top_p), drawn with the row's generator."""
        import torch

        chosen = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.greedy:
                continue
            probs = torch.softmax(logits[i] / row.temperature, dim=-1)
            if row.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > row.top_p  # the most likely token always stays
                ordered[outside] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, ordered)
            chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return chosen


def _spliceable(cache: Any) -> bool:
    """Whether rows can be spliced into this cache: every layer a plain growing one (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
