"""What tuna_llm assumes of torch, transformers, TRL and llama-cpp-python, one test per assumption (the list,
with why, is tuna_llm/serving/__init__.py's docstring). After an upgrade, a broken assumption fails here, by name."""

import importlib.util
import inspect

import pytest
import torch

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")


# -- torch ----------------------------------------------------------------------------------------
@needs_mkldnn
def test_it_relies_on_mkldnn_linear_pointwise_existing_with_this_signature():
    rows, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    assert out.shape == (3, 5)
    assert torch.allclose(out, torch.nn.functional.linear(rows, weight, bias), atol=1e-5)


@needs_mkldnn
def test_it_relies_on_mkldnn_reorder_linear_weight_giving_the_very_products_of_the_plain_weight():
    rows, weight = torch.randn(4, 64), torch.randn(32, 64)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    plain = torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")
    assert torch.equal(torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], ""), plain)


def test_it_relies_on_tensor_version_counting_every_in_place_write():
    weight = torch.nn.Linear(4, 4).weight
    before = weight._version
    with torch.no_grad():
        weight.add_(1.0)
    assert weight._version > before


def test_it_relies_on_linear_parameters_dict_holding_weight_and_bias():
    layer = torch.nn.Linear(4, 3)
    assert layer._parameters["weight"] is layer.weight and layer._parameters["bias"] is layer.bias
    assert torch.nn.Linear(4, 3, bias=False)._parameters["bias"] is None


def test_it_relies_on_a_linear_layer_taking_a_subclass_in_place():
    class Sub(torch.nn.Linear):
        pass

    layer = torch.nn.Linear(4, 3)
    layer.__class__ = Sub
    assert isinstance(layer, torch.nn.Linear) and layer(torch.randn(2, 4)).shape == (2, 3)


def test_it_relies_on_cpu_capabilities_naming_amx_and_avx512_bf16():
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("architecture") in ("x86_64", "x86", "AMD64"):
        assert "amx_tile" in capabilities and "avx512_bf16" in capabilities


# -- transformers -----------------------------------------------------------------------------------
def test_it_relies_on_attention_and_mask_interfaces_taking_a_registered_implementation():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(*args, **kwargs):
        return None

    AttentionInterface.register("tuna_contract_test", attention)
    AttentionMaskInterface.register("tuna_contract_test", sdpa_mask)
    assert AttentionInterface()["tuna_contract_test"] is attention
    assert AttentionMaskInterface()["tuna_contract_test"] is sdpa_mask


def test_it_relies_on_sdpa_attention_forward_with_this_signature():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    parameters = list(inspect.signature(sdpa_attention_forward).parameters)
    assert parameters[:8] == ["module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    query, key = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out, weights = sdpa_attention_forward(module, query, key, key, None, 0.0, None, None)
    assert out.shape == (1, 3, 2, 4) and weights is None  # [rows, positions, heads, dim]


def test_it_relies_on_dynamic_cache_layers_with_writable_keys_and_values():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    layer = cache.layers[0]
    assert type(layer) is DynamicLayer
    layer.keys, layer.values = layer.keys[:, :, 1:, :], layer.values[:, :, 1:, :]  # the shared padding cut off
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].keys.shape == (1, 1, 2, 4) and cache.get_seq_length() == 2


def test_it_relies_on_config_naming_its_attention_implementation():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=2, vocab_size=16)
    config._attn_implementation = "sdpa"
    assert config._attn_implementation == "sdpa"


# -- TRL ----------------------------------------------------------------------------------------------
def test_it_relies_on_trl_fused_lm_head_reading_use_triton_from_its_utils_module():
    from trl.trainer import utils as trl_utils

    assert callable(trl_utils._use_triton)
    assert trl_utils.add_fused_lm_head.__globals__ is vars(trl_utils)  # rebinding the module's name is seen
    assert "_use_triton(" in inspect.getsource(trl_utils.add_fused_lm_head)


# -- llama-cpp-python ---------------------------------------------------------------------------------
@needs_llama_cpp
def test_it_relies_on_jinja2_chat_formatter_rendering_with_bos_and_eos():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}", eos_token="</s>", bos_token="<s>"
    )
    rendered = formatter(messages=[{"role": "user", "content": "hi"}])
    assert rendered.prompt == "<s>hi</s>" and hasattr(rendered, "added_special")


# -- tokenizers -------------------------------------------------------------------------------------
@pytest.mark.model
def test_it_relies_on_decode_stream_pieces_joining_to_the_full_decode_of_the_embedded_tokenizer():
    """The transformers engine streams text with tokenizers' DecodeStream (each token decoded once) where
    batching.incremental_backend says its pieces join to ``decode``'s text: checked on text that splits
    multi-byte characters across tokens (accents, CJK, emoji with modifiers and joiners)."""
    from tokenizers.decoders import DecodeStream

    from tuna_llm.serving.batching import incremental_backend, padding_tokenizer
    from tuna_llm.serving.registry import registry

    tokenizer = padding_tokenizer(registry.get())
    backend = incremental_backend(tokenizer)
    assert backend is not None
    texts = [
        "Hello, world! It's a test.",
        "Écris « bonjour » — s'il te plaît: ça va? 😀👍🏽 日本語のテキスト",
        " leading  spaces and\nnewlines\n\n end ",
        "emoji 🧑\u200d🚀🏳️\u200d🌈 and ZWJ, ½ ∑ ≠, 한국어 العربية עברית",
    ]
    for text in texts:
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        stream = DecodeStream(skip_special_tokens=True)
        pieces = [stream.step(backend, token) for token in ids]
        assert "".join(piece for piece in pieces if piece) == tokenizer.decode(ids, skip_special_tokens=True) == text
