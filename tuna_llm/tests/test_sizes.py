"""What a run or an export will write, estimated from a base model's config.json and file sizes (tuna_llm.sizes)."""

from __future__ import annotations

import json

from tuna_llm import sizes

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def test_it_counts_a_lora_adapters_parameters_per_module_and_layer():
    # q: 8 x (576 + 576), v: 8 x (576 + 192), 30 layers: the 460,800 parameters PEFT reports for r=8 on q_proj, v_proj.
    assert sizes.lora_parameters(SMOLLM2_135M, r=8, target_modules=["q_proj", "v_proj"]) == 460_800
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sizes.lora_parameters(SMOLLM2_135M, r=16, target_modules=every) == 30 * 16 * (1152 + 768 + 768 + 1152 + 3 * 2112)


def test_it_estimates_a_run_as_the_adapter_plus_three_copies_per_kept_checkpoint():
    assert sizes.run_bytes(1000, kept_checkpoints=0) == 1000
    assert sizes.run_bytes(1000, kept_checkpoints=3, extra_bytes=7) == 1000 * 10 + 7


def test_it_estimates_an_export_per_format():
    params, weights = 1_000_000, 4_000_000
    assert sizes.export_bytes(["merged_safetensors"], weight_bytes=weights, parameters=params) == weights
    assert sizes.export_bytes(["gguf_f16"], weight_bytes=weights, parameters=params) == 2_000_000
    assert sizes.export_bytes(["gguf_q8_0"], weight_bytes=weights, parameters=params) == 1_070_000
    assert sizes.export_bytes(["gguf_q4"], weight_bytes=weights, parameters=params) == 600_000
    assert sizes.export_bytes(["merged_safetensors", "gguf_f16", "gguf_q8_0"], weight_bytes=weights, parameters=params) == 7_070_000


def test_it_reads_the_sizes_from_the_models_folder_and_gives_none_without_it(tmp_path):
    assert sizes.run_estimate(tmp_path, r=8, target_modules=["q_proj"], kept_checkpoints=1) is None
    assert sizes.export_estimate(tmp_path, ["gguf_f16"]) is None
    assert sizes.run_estimate(None, r=8, target_modules=["q_proj"], kept_checkpoints=1) is None
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    (tmp_path / "tokenizer.json").write_bytes(b"t" * 100)
    adapter = 460_800 * 4
    assert sizes.run_estimate(tmp_path, r=8, target_modules=["q_proj", "v_proj"], kept_checkpoints=2) == adapter * 7 + 100
    assert sizes.export_estimate(tmp_path, ["gguf_f16"]) is None  # no weights here (a hub model not prepared)
    (tmp_path / "model.safetensors").write_bytes(b"w" * 5000)
    parameters = sizes.estimate_parameters(SMOLLM2_135M)
    assert sizes.export_estimate(tmp_path, ["merged_safetensors", "gguf_f16"]) == 5000 + parameters * 2
