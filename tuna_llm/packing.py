"""Linear layers whose bf16 weights are laid out once for the CPU's matrix kernels, not on every product.

On CPU, torch hands a bf16 matrix product to oneDNN, whose AMX and AVX512-BF16 kernels read the weight in a
blocked layout of their own. Given a plain [out, in] weight, they re-lay it out on every call: at decoding
sizes (2 to 8 rows) that copy costs more than the product. Measured on a 2-core CPU with AMX, SmolLM2's
576 x 1536 projection, 2 rows: 92-110 us plain, 48-61 us packed (fp32 on the same CPU: 37-53 us); single-stream
decoding in bf16 ran at 0.70x the fp32 engine before packing. ``pack_linear_weights`` does the layout once at
load with the calls PyTorch's own compiler uses when it freezes a CPU model (``mkldnn._reorder_linear_weight``,
then ``mkldnn._linear_pointwise`` per product): the same kernel on the same blocks, so the results are the
plain product's, bit for bit (tested on the model's logits).

For the serving model only (evaluation and the API; training changes its weights every step and keeps plain
ones). The packed copy sits beside the plain weight, which stays for what reads it (an output layer tied to the
embeddings, peft's adapter set-up, the parameter count): the linear layers' weights take twice their memory
(SmolLM2-135M: +~270 MB; a Llama 3.1 8B served on CPU: +~15 GB), which ``TUNA_PACK_WEIGHTS=off`` avoids.
Nothing merges into a serving model's weights (exports merge on a fresh load), which would leave the packed
copy stale; ``PackedLinear`` refuses to compute from a weight that changed since it was packed.
"""

from __future__ import annotations

from functools import cache
from typing import Any


def can_pack(plan: Any) -> bool:
    """Whether this plan's products go through oneDNN's bf16 kernels: bf16 on a CPU with oneDNN."""
    import torch

    return plan.device == "cpu" and plan.dtype_name == "bfloat16" and torch.backends.mkldnn.is_available()


def pack_linear_weights(model: Any) -> int:
    """Pack every bf16 ``nn.Linear`` of ``model`` in place (its class becomes ``PackedLinear``, still an
    ``nn.Linear`` for peft); returns how many were packed."""
    import torch

    packed_linear = packed_linear_class()
    packed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            module.__class__ = packed_linear
            module.pack()
            packed += 1
    return packed


@cache
def packed_linear_class() -> type:
    """The ``PackedLinear`` class (made on first use: torch is imported late, the web process starts without it)."""
    import torch

    class PackedLinear(torch.nn.Linear):
        """``nn.Linear`` computing from a copy of its weight packed for oneDNN (see the module's docstring).
        With gradients wanted, it computes the plain way (the packed kernel has no backward)."""

        def pack(self) -> None:
            with torch.no_grad():
                # The hint (rows per product) picks nothing that changes results; 8 is a decoding batch.
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8)
            self._packed_from = (self.weight.data_ptr(), self.weight._version)

        def forward(self, input: Any) -> Any:
            if torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad):
                return super().forward(input)
            if input.dtype != torch.bfloat16 or input.device.type != "cpu":
                return super().forward(input)
            if (self.weight.data_ptr(), self.weight._version) != self._packed_from:
                raise RuntimeError("A packed linear layer's weight changed after packing; pack it again (PackedLinear.pack).")
            return torch.ops.mkldnn._linear_pointwise(input, self._packed, self.bias, "none", [], "")

    return PackedLinear
