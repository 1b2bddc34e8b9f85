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
    sized = {"weight_bytes": 4_000_000, "parameters": 1_000_000}
    # Kept in the job's folder: merged weights; the adapter as an f16 LoRA GGUF; the merged model in q8_0.
    assert sizes.export_bytes(["merged_safetensors"], adapter_bytes=8000, **sized) == 4_000_000
    assert sizes.export_bytes(["gguf_f16"], adapter_bytes=8000, **sized) == 4000
    assert sizes.export_bytes(["gguf_q8_0"], adapter_bytes=8000, **sized) == 1_070_000
    assert sizes.export_bytes(["merged_safetensors", "gguf_f16", "gguf_q8_0"], adapter_bytes=8000, **sized) == 5_074_000
    # Written elsewhere: the base's GGUF conversions not made yet (f16: 2 bytes a parameter, q8_0: 1.07), and the merged
    # weights a q8_0-only export writes while it runs.
    assert sizes.shared_export_bytes(["gguf_f16", "gguf_q8_0", "merged_safetensors"], **sized) == 3_070_000
    assert sizes.shared_export_bytes(["gguf_f16", "gguf_q8_0"], converted=["f16", "q8_0"], **sized) == 4_000_000
    assert sizes.shared_export_bytes(["gguf_f16"], converted=["f16"], **sized) == 0
    assert sizes.GGUF_BYTES_PER_PARAMETER["q4"] == 0.6


def test_it_reads_the_sizes_from_the_models_folder_and_gives_none_without_it(tmp_path):
    assert sizes.run_estimate(tmp_path, r=8, target_modules=["q_proj"], kept_checkpoints=1) is None
    assert sizes.export_estimate(tmp_path, ["gguf_f16"], adapter_dir=None) is None
    assert sizes.run_estimate(None, r=8, target_modules=["q_proj"], kept_checkpoints=1) is None
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    (tmp_path / "tokenizer.json").write_bytes(b"t" * 100)
    adapter = 460_800 * 4
    assert sizes.run_estimate(tmp_path, r=8, target_modules=["q_proj", "v_proj"], kept_checkpoints=2) == adapter * 7 + 100
    assert sizes.export_estimate(tmp_path, ["gguf_f16"], adapter_dir=None) is None  # no weights here (a hub model not prepared)
    (tmp_path / "model.safetensors").write_bytes(b"w" * 5000)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"a" * 600)
    parameters = sizes.estimate_parameters(SMOLLM2_135M)
    kept, elsewhere = sizes.export_estimate(tmp_path, ["merged_safetensors", "gguf_f16"], adapter_dir=adapter)
    assert (kept, elsewhere) == (5000 + 300, parameters * 2)
