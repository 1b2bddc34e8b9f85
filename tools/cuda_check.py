"""The CUDA path of the model layer, checked on a GPU machine (the project never needs one).

No model hub there and no room to carry real weights, so the check builds a small Llama-architecture model
with random weights around the embedded model's real tokenizer and chat template (--tokenizer), then runs
the platform's own code on it, in the precision the platform picks there (bf16 on a GPU that has it):

1. precision: pick_device() and why;
2. training: run_lora_training (Trainer, LoRA in fp32 on the bf16 base, the answer-token loss) on the sample,
   N updates; the loss must fall and the adapter be saved in fp32;
3. evaluation pieces: held-out loss in batches, equal to one example at a time (within bf16 rounding);
4. generation: greedy answers of base and fine-tuned rows decoded together (continuous batching, mixed
   adapters, row-wise attention) against each alone; a request joining a running batch; tokens/s.

    python3 tools/cuda_check.py --tokenizer DIR [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json, tokenizer_config.json, config.json")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuna_llm import settings as llm_settings
    from tuna_llm.catalog import BaseModelSpec
    from tuna_llm.evaluation import answer_loss
    from tuna_llm.loading import pick_device
    from tuna_llm.prompting import render_chat
    from tuna_llm.serving.batching import BatchingEngine, GenerationRequest, decode_all
    from tuna_llm.serving.registry import load_for_serving
    from tuna_llm.training import run_lora_training
    from tuna_llm.training_config import TrainingConfig

    print(
        f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}"
    )
    plan = pick_device()
    print(f"1. precision: {plan.describe()}")

    work = Path(tempfile.mkdtemp())
    model_dir = work / "tiny-llama"
    real = json.loads((Path(args.tokenizer) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=real["vocab_size"],
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=real.get("bos_token_id"),
        eos_token_id=real.get("eos_token_id"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(model_dir)
    spec = BaseModelSpec(name="tiny-llama", source=str(model_dir), cache_dir=work)
    llm_settings.configure(
        lambda: llm_settings.LlmSettings(base_models={spec.name: str(model_dir)}, default_base_model=spec.name, model_cache_dir=work)
    )

    lines = [json.loads(line) for line in (ROOT / "samples" / "orders_to_json.jsonl").read_text().splitlines() if line.strip()]
    examples = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in lines]
    train, held_out = examples[:120], examples[120:152]
    cfg = TrainingConfig(
        base_model=spec.name,
        max_steps=args.steps,
        batch_size=4,
        learning_rate=3e-3,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        eval_examples=8,
    )
    started = time.perf_counter()
    result = run_lora_training(cfg, spec=spec, plan=plan, train_examples=train, eval_examples=held_out[:8], output_dir=work / "job")
    from safetensors.torch import load_file

    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    dtypes = sorted({str(t.dtype) for t in weights.values()})
    print(
        f"2. training: {result.global_step} updates, {result.tokens_seen / result.train_seconds:.0f} tokens/s, "
        f"best validation loss {result.best_eval_loss:.3f} at step {result.best_step}, adapter weights {dtypes}, "
        f"{time.perf_counter() - started:.0f} s"
    )

    loaded = load_for_serving(spec, plan)
    tokenizer = loaded.tokenizer
    loaded.attach_adapter("tuned", result.adapter_dir)
    batched = answer_loss(loaded, held_out, adapter="tuned")
    single = answer_loss(loaded, held_out, adapter="tuned", batch_size=1)
    base_loss = answer_loss(loaded, held_out, adapter=None)
    print(f"3. held-out loss: base {base_loss:.4f}, fine-tuned {batched:.4f} in batches of 8 vs {single:.4f} one at a time")

    texts = [render_chat(tokenizer, m[:-1], add_generation_prompt=True) for m in held_out[:16]]
    alone = []
    for text in texts:
        for adapter in (None, "tuned"):
            request = GenerationRequest(text=text, max_new_tokens=32, adapter=adapter)
            decode_all(loaded, [request], max_batch=1)
            alone.append(request.result.text)
    together = [GenerationRequest(text=t, max_new_tokens=32, adapter=a) for t in texts for a in (None, "tuned")]
    started = time.perf_counter()
    decode_all(loaded, together, max_batch=8)
    seconds = time.perf_counter() - started
    equal = sum(a == r.result.text for a, r in zip(alone, together, strict=True))
    tokens = sum(r.result.completion_tokens for r in together)
    print(
        f"4. generation: {equal}/{len(alone)} greedy answers equal batched (base + fine-tuned rows mixed) vs alone; {tokens / seconds:.0f} tokens/s batched"
    )
    exact = sum(r.result.text == m[-1]["content"] for r, m in zip(together[1::2], held_out, strict=False))
    print(
        f"   fine-tuned exact match on {len(texts)} held-out prompts: {exact}/{len(texts)} (random-weight model: any number proves only the path)"
    )

    engine = BatchingEngine(loaded, window_s=0.0)
    long = GenerationRequest(text=texts[0], max_new_tokens=200, adapter="tuned")
    engine.submit(long)
    long.deltas.get(timeout=60)
    short = GenerationRequest(text=texts[1], max_new_tokens=4)
    engine.submit(short)
    short.done.wait(60)
    joined = not long.done.is_set()
    long.done.wait(120)
    print(f"   continuous batching: short request done while the long one decoded: {joined}; admissions {engine.batches_run}")


if __name__ == "__main__":
    main()
