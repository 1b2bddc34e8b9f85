"""llama-quantize as the export calls it (the real program, built by `make install`), and how a quantized variant's
parity is worded. The quantization of a real fine-tune is tested with the export (training_app/tests/test_export.py)."""

from __future__ import annotations

import pytest

from tuna_llm import gguf_export, llama_tools, ollama


def test_it_refuses_a_quantization_type_the_export_does_not_offer(tmp_path):
    with pytest.raises(ValueError, match="Unknown quantization 'Q2_K'; choose from Q4_K_M, Q5_K_M"):
        gguf_export.quantize(tmp_path / "in.gguf", tmp_path / "q" / "out.gguf", "Q2_K")
    assert not (tmp_path / "q").exists()


@pytest.mark.process
def test_it_fails_a_broken_gguf_with_llama_quantizes_own_message_and_leaves_no_file(tmp_path):
    assert llama_tools.binary(llama_tools.QUANTIZE).is_file()  # installed by `make install`
    work = tmp_path / "q"
    work.mkdir()
    broken = work / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(gguf_export.ConversionFailed, match=r"llama-quantize Q4_K_M failed \(exit [1-9]\d*\): .*\S"):
        gguf_export.quantize(broken, work / "out.gguf", "Q4_K_M")
    assert sorted(p.name for p in work.iterdir()) == ["broken.gguf"]  # no output, no *.partial


def test_it_words_a_quantized_variants_parity_as_it_is():
    quantization = {
        "type": "Q4_K_M",
        "bits": 4,
        "tensors": 272,
        "fallbacks": {"q4_K -> q5_0": 166, "q6_K -> q8_0": 14},
        "fallback_widths": [576],
    }
    note = ollama.quantization_note(quantization, 29, 32)
    assert note == (
        "a 4-bit model differs: 3 of 32 answers differ; llama-quantize kept 180 of 272 tensors at a wider type "
        "(rows 576 wide do not divide into its blocks of 256: q4_K -> q5_0 x166, q6_K -> q8_0 x14)"
    )
    assert (
        ollama.quantization_note({"type": "Q5_K_M", "bits": 5, "fallbacks": {}}, 31, 32) == "a 5-bit model differs: 1 of 32 answers differs"
    )
    assert ollama.quantization_note({"type": "Q5_K_M", "bits": 5}, 32, 32) == "a 5-bit model differs: 0 of 32 answers differ"

    readme = ollama.bundle_readme(
        name="tuna-job-7",
        quantized_ggufs=["merged-q5_k_m.gguf", "merged-q4_k_m.gguf"],
        modelfile_name="Modelfile.q5_k_m",
        parity={"q4_k_m": {"identical": 29, "total": 32, "quantization": quantization, "note": note, "exact_match_gguf": 20}},
    )
    assert f"- q4_k_m: 29/32 answers identical; {note}; exact match 20 (GGUF) vs ? (PyTorch)" in readme
    assert "llama-server -m merged-q4_k_m.gguf --jinja --port 8080" in readme
    assert "# or the merged model quantized (Q5_K_M): smaller and faster, answers may differ" in readme
    assert "ollama create tuna-job-7 -f Modelfile.q5_k_m" in readme
    assert "The quantized files have their own: `ollama create tuna-job-7-<type> -f Modelfile.q4_k_m`." in readme
