"""Serving: the engines behind one interface, and everything the batch-invariance promise needs. Django-free.

The promise: **a row's answer does not depend on its batch.** A greedy answer decoded alone, beside other
rows, with any padding, through any mix of adapters, is the same token for token. Evaluation decodes
batched, the API decodes whatever arrives together and the export's parity check decodes its prompts as
one batch, so a user who compares them sees the same answers. It rests on row-wise attention (``rowwise``),
row-stable matrix products (``packing``: oneDNN serving layers on CPU; ``decoding``'s ghost copy of a lone
row elsewhere), and a decoding loop that only ever splices rows into one cache (``decoding``, ``batching``).
Tested in tuna_llm/tests/test_decoding.py; each assumption about a dependency is pinned by one test in
tuna_llm/tests/test_engine_contracts.py, so an upgrade fails there, by name.

The promise is the transformers engine's. Exported GGUF models are served by llama.cpp's own server, whose
batches are its own: its greedy answers are checked against transformers' by the export's parity check.

Modules: ``engine`` (the interface, Generation, request checks), ``batching`` (the transformers engine:
continuous batching), ``openai_engine`` (one client for every engine that speaks OpenAI's completions
protocol: llama-server, vLLM, SGLang; the prompt rendered by us, the adapter chosen per request),
``llama_server`` (llama-server started and supervised by the product: one per base GGUF and process, with
its LoRAs), ``compute`` (the one device thread the transformers engine steps on), ``registry`` (base models
loaded once, adapters attached; serving layers prepared), ``decoding``, ``rowwise``, ``packing``.

Private accesses of dependencies that remain in tuna_llm (each pinned by a contract test):

- ``torch.ops.mkldnn._linear_pointwise`` (packing): oneDNN's linear for fp32 and bf16 alike; torch's public
  linear sends fp32 to MKL, whose products for a row depend on the call's row count.
- ``torch.ops.mkldnn._reorder_linear_weight`` (packing): packs a weight once in oneDNN's layout, as torch's
  own CPU freezing pass does; no public call packs for ``_linear_pointwise``.
- ``Tensor._version`` (packing ``ServingLinear._source``; training ``_frozen_fp32_weight``): torch's in-place
  write counter; the only way to notice a weight changed after it was packed or cached in fp32.
- ``nn.Module._parameters`` (packing ``ServingLinear.forward``): the weight read from the module's dict, as
  ``nn.Linear`` itself does, to skip ``__getattr__`` on every product of a decoding step.
- ``module.__class__ = ServingLinear`` (packing): a linear layer turned into a serving layer in place, so peft
  still sees an ``nn.Linear`` and the weights are not copied.
- ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (rowwise; training's fp32 attention):
  the very call transformers makes for one unpadded sequence; not exported at the top level.
- cache layers' ``keys``/``values`` written directly, and ``type(layer) is DynamicLayer`` (decoding): rows are
  spliced into and cut out of a running ``DynamicCache``; the Cache API only appends along the sequence.
- ``model.config._attn_implementation`` (training): which attention transformers picked, read to give bf16
  CPU training fp32 attention only where the model would run SDPA.
- ``trl.trainer.utils._use_triton`` (preference ``answer_positions_only``): rebound while a DPO run trains so
  TRL's fused LM head scores only the labelled positions on CPU too; TRL has no option for it.

llama-cpp-python is used for its Jinja2 chat formatter only (``llama_server.GgufPrompts``: the GGUF's template
rendered as llama.cpp's Python users get it); llama-server through its documented HTTP API (/health, /props,
/tokenize, /v1/completions with a per-request ``"lora"``).
"""
