"""The serving model's linear layers on CPU: oneDNN kernels, row-stable call shapes, packed weights.

For the serving model only (evaluation and the API; training keeps plain layers), in fp32 and in bf16 on a CPU
that computes bf16 natively (AMX or AVX512-BF16):

1. **oneDNN for every product.** torch hands a bf16 product on CPU to oneDNN but an fp32 one to MKL, whose
   two-row products cost about twice one-row ones and whose results for a row depend on the call's row count
   on some CPUs. ``ServingLinear`` calls oneDNN's linear (``mkldnn._linear_pointwise``) in both precisions.
2. **Each row's product independent of what it is computed with.** oneDNN picks its kernel by the shape of the
   whole call: on a CPU with AMX, bf16 calls above 32 rows go to a kernel whose result for a row depends on the
   row count; in fp32 a one-row call rounds apart from a call of two or more. ``ServingLinear`` computes a
   decoding step (one position per row) in calls of 2 to STEP_ROWS rows (a lone row goes twice, in the call:
   the rest of the step is done once) and a sequence (a prefill, a held-out loss pass) in calls of exactly
   SEQUENCE_ROWS rows, the last one padded: every row then gets the result it gets anywhere else. A LoRA
   adapter's layers are made serving layers when it is attached (registry), so a fine-tuned lone row needs no
   copy either.
3. **Weights packed once** (``TUNA_PACK_WEIGHTS``, on by default). oneDNN reads the weight in a blocked layout
   of its own and re-lays a plain weight out on every call; the layout is done once at load with the calls
   torch's own compiler uses when it freezes a CPU model (``mkldnn._reorder_linear_weight``, then
   ``mkldnn._linear_pointwise``): the same kernels, so the same results bit for bit (tested, both
   precisions). The packed copy sits beside the plain weight, which stays for what reads it (an output layer
   tied to the embeddings, peft's adapter set-up), so the linear layers' weights take twice their memory.
4. **One product for the layers that read the same input** (packed weights only): a block's query, key and
   value projections, and its gate and up projections (``SHARED_INPUT``, ``ProductGroup``), with the same
   results: each group is checked against its members' own products when it is made, on the machine itself;
   where they differ, the layers stay apart.

Nothing merges into a serving model's weights (exports merge on a fresh load); a packed layer refuses to compute
from a weight or bias replaced or changed in place since it was packed (torch's version counter; an edit through
``.data`` is not seen). bf16 forced on a CPU without native bf16 is emulated and keeps torch's own layers.
Measurements: docs/performance.md.
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


# Layers of one block that read the same input (Llama's, Mistral's and Qwen2's names; Phi-3 has them fused already).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def prepare_linear_layers(model: Any, *, pack: bool) -> int:
    """Make every fp32 or bf16 ``nn.Linear`` of ``model`` a ``ServingLinear`` in place (still an ``nn.Linear`` for
    peft), its weight packed when ``pack``: the layers of a block that read the same input (SHARED_INPUT) into one
    packed product (``ProductGroup``), the others each on their own; returns how many layers were made."""
    import torch

    serving_linear = serving_linear_class()
    made = []
    for module in model.modules():
        if (
            type(module) is torch.nn.Linear
            and module.weight.dtype in (torch.float32, torch.bfloat16)
            and module.weight.device.type == "cpu"
        ):
            module.__class__ = serving_linear
            module.prepare(pack=False)
            made.append(module)
    if pack:
        new = set(made)
        for parent in model.modules():
            for names in SHARED_INPUT:
                members = [getattr(parent, name, None) for name in names]
                if all(member in new for member in members) and ProductGroup.fits(members):
                    group = ProductGroup(members)
                    if group.agrees():
                        group.join()
                        new.difference_update(members)
        for module in made:
            if module in new:
                module.prepare(pack=True)
    return len(made)


def products_row_stable(model: Any) -> bool:
    """Whether every matrix product of ``model`` goes through a serving layer: each module that holds a parameter of
    two or more dimensions is a ``ServingLinear`` or an embedding (a lookup). Not so for a layer left as torch's own
    (another dtype or device), GPT-2's Conv1D, experts held as 3-D parameters, or peft's LoRA on embeddings."""
    import torch

    serving_linear = serving_linear_class()
    for module in model.modules():
        if isinstance(module, serving_linear | torch.nn.Embedding):
            continue
        if any(parameter.dim() >= 2 for parameter in module.parameters(recurse=False)):
            return False
    return True


def _linear(rows: Any, weight: Any, bias: Any) -> Any:
    import torch

    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _row_stable(product: Any, input: Any) -> Any:
    """``product`` (rows -> rows) over ``input`` [..., features] in row-stable calls: a decoding step (one position
    per row) in calls of at most STEP_ROWS rows, a lone row computed twice (a one-row call rounds apart in fp32; two
    cost what one does); a sequence in calls of exactly SEQUENCE_ROWS rows, the last one padded."""
    import torch

    shape = input.shape
    rows = input.reshape(-1, shape[-1])
    total = rows.shape[0]
    if len(shape) >= 3 and shape[-2] == 1:  # a decoding step: small calls, as they come
        calls = [rows[i : i + STEP_ROWS] for i in range(0, total, STEP_ROWS)]
        parts = [product(torch.cat([call, call]))[:1] if call.shape[0] == 1 else product(call) for call in calls]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:  # a sequence: calls of exactly SEQUENCE_ROWS rows
        missing = -total % SEQUENCE_ROWS
        if missing:
            rows = torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
        out = torch.cat([product(rows[i : i + SEQUENCE_ROWS]) for i in range(0, rows.shape[0], SEQUENCE_ROWS)])[:total]
    return out.view(*shape[:-1], out.shape[-1])


class ProductGroup:
    """Serving layers that read the same input (a block's query, key and value projections; its gate and up
    projections) computed as one product, their packed weights side by side: a decoding step makes 4 calls per
    block instead of 7 (each call costs more than its bytes at decoding sizes). Each output is the same dot product either way
    (oneDNN's result for an output column did not depend on the columns beside it on the CPU measured; ``agrees``
    checks it when the group is made, and the model's logits are tested grouped against each layer on its own).
    The first member called with an input computes every member's output; the others take theirs for that very
    input; a new input starts again. Only where weights are packed: the packed copy replaces the members' own (no
    memory beyond theirs)."""

    def __init__(self, members: list[Any]) -> None:
        import torch

        self.members = members
        self.sizes = [member.out_features for member in members]
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in members]), STEP_ROWS)
            self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self._input: Any = None
        self._outputs: dict[Any, Any] = {}

    def agrees(self) -> bool:
        """Whether the group's product gives each member, on this machine, the very result of the member's own: random
        rows, in every call size a decoding step uses (2 to STEP_ROWS) and a sequence's (SEQUENCE_ROWS), against
        each member's weight packed alone (packed and plain weights give the same results; tested). Where it would
        not, the members stay apart."""
        import torch

        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            own = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), STEP_ROWS) for m in self.members]
            for count in [*range(2, STEP_ROWS + 1), SEQUENCE_ROWS]:
                rows = torch.randn(count, self.members[0].in_features, generator=generator).to(self.packed.dtype)
                parts = self._product(rows).split(self.sizes, dim=-1)
                for member, weight, part in zip(self.members, own, parts, strict=True):
                    if not torch.equal(part, _linear(rows, weight, member.bias)):
                        return False
        return True

    def join(self) -> None:
        for member in self.members:
            member._group = self

    @staticmethod
    def fits(members: list[Any]) -> bool:
        first = members[0]
        return all(
            m.in_features == first.in_features and m.weight.dtype == first.weight.dtype and (m.bias is None) == (first.bias is None)
            for m in members
        )

    def _product(self, rows: Any) -> Any:
        return _linear(rows, self.packed, self.bias)

    def output(self, member: Any, input: Any) -> Any:
        # The input itself, held until every member has its output (so it cannot be another tensor at the same id).
        if self._input is not input or member not in self._outputs:
            out = _row_stable(self._product, input)
            self._outputs = {m: part.contiguous() for m, part in zip(self.members, out.split(self.sizes, dim=-1), strict=True)}
            self._input = input
        result = self._outputs.pop(member)
        if not self._outputs:
            self._input = None  # every member has its output: hold nothing
        return result


@cache
def serving_linear_class() -> type:
    """The ``ServingLinear`` class (made on first use: torch is imported late, the web process starts without it)."""
    import torch

    class ServingLinear(torch.nn.Linear):
        """``nn.Linear`` with row-stable call shapes and, optionally, a packed weight of its own or its group's (see
        the module's docstring). With gradients wanted, it computes the plain way (the packed kernel has no backward)."""

        def prepare(self, *, pack: bool) -> None:
            self._packed = None
            self._group: ProductGroup | None = None
            if pack:
                with torch.no_grad():
                    # The hint (rows per product) picks nothing that changes results.
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), STEP_ROWS)
            self._packed_from = self._source()

        def _source(self) -> tuple:
            """What the packed copy was made from: the weight's (and bias's) storage and in-place version (torch's
            version counter: an edit through ``.data`` is not seen)."""
            weight, bias = self._parameters["weight"], self._parameters["bias"]
            if bias is None:
                return (weight.data_ptr(), weight._version)
            return (weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)

        @property
        def packed(self) -> bool:
            """Whether it computes from a packed copy of its weight (its own or its group's)."""
            return self._packed is not None or self._group is not None

        def _product(self, rows: Any) -> Any:
            weight = self._parameters["weight"] if self._packed is None else self._packed  # same kernel, same results
            return _linear(rows, weight, self._parameters["bias"])

        def forward(self, input: Any) -> Any:
            # Called for every linear layer of every decoding step: the parameters are read from their dict
            # (nn.Module's attribute lookup would cost more than a small product's own overhead).
            weight = self._parameters["weight"]
            if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
                return super().forward(input)
            if input.dtype != weight.dtype or input.device.type != "cpu" or not input.numel():
                return super().forward(input)
            if self.packed and self._source() != self._packed_from:
                raise RuntimeError("A packed linear layer's weight changed after packing; load the model again.")
            if self._group is not None:
                return self._group.output(self, input)
            return _row_stable(self._product, input)

    return ServingLinear
