"""The serving model's linear layers on CPU: oneDNN kernels, row-stable call shapes, packed weights.

For the serving model only (evaluation and the API; training keeps plain layers), in fp32 and in bf16 on a CPU
that computes bf16 natively (AMX or AVX512-BF16):

1. **oneDNN for every product.** torch hands a bf16 product on CPU to oneDNN but an fp32 one to MKL, whose
   products of two rows cost about twice those of one on the 2-core AMD EPYC (AVX512-BF16) measured here:
   576 x 1536, 101 us for 1 row against 186 us for 2; the 49152 x 576 output layer 13.4 ms against 25.9 ms.
   Decoding never runs a lone row (tuna_llm.decoding's ghost copy), so the fp32 engine decoded a single stream
   at 9.1 tokens/s where plain ``generate`` (one row) made 14.1. ``ServingLinear`` calls oneDNN's linear
   (``mkldnn._linear_pointwise``) in both precisions: the output layer 5.7 ms for 2 rows, the fp32 engine
   18.7 tokens/s single stream on that CPU (bench/generation.py; 16.8 with the weights unpacked).
   On an Intel CPU MKL's fp32 products are faster (2-core Xeon with AMX: 26.6 tokens/s against 20.2) but not
   row-stable: a row's fp32 logits differed by 2e-5 between alone and in a batch of four (oneDNN's: equal), so
   fp32 goes through oneDNN there too (answers batched = alone come first).
2. **Each row's product independent of what it is computed with.** oneDNN picks its kernel by the shape of the
   whole call. On a CPU with AMX, bf16 calls of up to 32 rows go to one kernel and larger ones to the AMX
   kernel, whose results for a row also depend on how many rows the call has (measured on SmolLM2's 576 x 576
   and 1536 x 576 projections: 39 of 39 row counts between 33 and 300 gave some row a different result; calls
   of up to 32 rows and calls of a fixed larger size never did, wherever the row sat). So a prompt's prefill
   gave different logits alone than in a batch (every one of 8 sample prompts; 8 of 32 base-model answers of
   the evaluation bench changed), and "batched = alone" (tuna_llm.rowwise) broke. In fp32, a call of one row
   rounds differently from a call of two or more. ``ServingLinear`` computes a decoding step (one position
   per row) in calls of 2 to 16 rows (a lone row goes twice) and a sequence (a prefill, a held-out
   loss pass) in calls of exactly 64 rows, the last one padded: every row then gets the result it gets
   anywhere else.
3. **Weights packed once** (``TUNA_PACK_WEIGHTS``, on by default). oneDNN reads the weight in a blocked layout
   of its own and, given a plain [out, in] weight, re-lays it out on every call: at decoding sizes that copy
   costs more than the product (2-core CPU with AMX, bf16 576 x 1536, 2 rows: 92-110 us plain, 48-61 us
   packed; single-stream bf16 decoding ran at 0.70x the fp32 engine unpacked). The layout is done once at
   load with the calls PyTorch's own compiler uses when it freezes a CPU model
   (``mkldnn._reorder_linear_weight``, then ``mkldnn._linear_pointwise``): the same kernels, so the same
   results bit for bit (tested on the model's logits, both precisions). The packed copy sits beside the plain
   weight, which stays for what reads it (an output layer tied to the embeddings, peft's adapter set-up): the
   linear layers' weights take twice their memory (SmolLM2-135M: +~270 MB in bf16, +~540 MB in fp32; a
   Llama 3.1 8B on CPU: +~15 GB in bf16, +~30 GB in fp32); off, oneDNN reads the plain weights, with the same call shapes
   and results.

Nothing merges into a serving model's weights (exports merge on a fresh load); a packed layer refuses to compute
from a weight that changed since it was packed. bf16 forced on a CPU without native bf16 is emulated and keeps
torch's own layers.
"""

from __future__ import annotations

from functools import cache
from typing import Any

STEP_ROWS = 16  # a decoding step's rows per call, at most (one kernel for up to 32 rows on an AMX CPU)
SEQUENCE_ROWS = 64  # a sequence's rows per call, exactly (the last call padded)


def applies(plan: Any) -> bool:
    """Whether this plan's serving layers go through oneDNN: on CPU, fp32, or bf16 where the CPU computes it
    natively (AMX or AVX512-BF16; bf16 forced on a CPU without them is emulated, and left as it is)."""
    import torch

    from tuna_llm.loading import native_bf16

    return (
        plan.device == "cpu"
        and torch.backends.mkldnn.is_available()
        and (plan.dtype_name == "float32" or (plan.dtype_name == "bfloat16" and (native_bf16() or ("",))[0] == "cpu"))
    )


def prepare_linear_layers(model: Any, *, pack: bool) -> int:
    """Make every fp32 or bf16 ``nn.Linear`` of ``model`` a ``ServingLinear`` in place (still an ``nn.Linear`` for peft),
    its weight packed when ``pack``; returns how many."""
    import torch

    serving_linear = serving_linear_class()
    done = 0
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.dtype in (torch.float32, torch.bfloat16)
            and module.weight.device.type == "cpu"
        ):
            module.__class__ = serving_linear
            module.prepare(pack=pack)
            done += 1
    return done


@cache
def serving_linear_class() -> type:
    """The ``ServingLinear`` class (made on first use: torch is imported late, the web process starts without it)."""
    import torch

    class ServingLinear(torch.nn.Linear):
        """``nn.Linear`` with row-stable call shapes and, optionally, a packed weight (see the module's docstring).
        With gradients wanted, it computes the plain way (the packed kernel has no backward)."""

        def prepare(self, *, pack: bool) -> None:
            self._packed = None
            if pack:
                with torch.no_grad():
                    # The hint (rows per product) picks nothing that changes results.
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), STEP_ROWS)
            self._packed_from = (self.weight.data_ptr(), self.weight._version)

        def _product(self, rows: Any) -> Any:
            weight = self.weight if self._packed is None else self._packed  # the same kernel, the same results
            return torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")

        def _step_product(self, rows: Any) -> Any:
            """At most STEP_ROWS rows; a lone row computed twice (a one-row call rounds apart in fp32; two cost
            what one does)."""
            return self._product(rows.repeat(2, 1))[:1] if rows.shape[0] == 1 else self._product(rows)

        def forward(self, input: Any) -> Any:
            if torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad):
                return super().forward(input)
            if input.dtype != self.weight.dtype or input.device.type != "cpu" or not input.numel():
                return super().forward(input)
            if self._packed is not None and (self.weight.data_ptr(), self.weight._version) != self._packed_from:
                raise RuntimeError("A packed linear layer's weight changed after packing; prepare it again (ServingLinear.prepare).")
            rows = input.reshape(-1, input.shape[-1])
            total = rows.shape[0]
            if input.dim() >= 3 and input.shape[-2] == 1:  # a decoding step: small calls, as they come
                if total <= STEP_ROWS:
                    out = self._step_product(rows)
                else:
                    out = torch.cat([self._step_product(rows[i : i + STEP_ROWS]) for i in range(0, total, STEP_ROWS)])
            else:  # a sequence: calls of exactly SEQUENCE_ROWS rows
                missing = -total % SEQUENCE_ROWS
                if missing:
                    rows = torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
                out = torch.cat([self._product(rows[i : i + SEQUENCE_ROWS]) for i in range(0, rows.shape[0], SEQUENCE_ROWS)])[:total]
            return out.reshape(*input.shape[:-1], out.shape[-1])

    return ServingLinear
