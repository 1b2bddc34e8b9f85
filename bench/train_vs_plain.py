"""Training throughput: a plain transformers + peft loop vs the platform's training code.

Same data (the sample's training split, as the platform splits it), same settings (the defaults: batch 4, LoRA r 8 on q_proj/v_proj,
lr 2e-4, max_seq_length 512), same number of steps. Prints tokens per second for both and the ratio.

    .venv/bin/python bench/train_vs_plain.py [--steps 40]
"""

import argparse
import time

from _common import temporary_site, upload_sample


def plain_loop(config, spec, plan, examples, steps: int) -> tuple[int, float]:
    import torch
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from inference_app.loading import load_tokenizer_and_model
    from training_app.lora import PadCollator, lora_config, tokenize_examples

    torch.manual_seed(config.seed)
    tokenizer, model = load_tokenizer_and_model(spec, plan)
    rows = tokenize_examples(tokenizer, examples, config.max_seq_length)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(config))
    model.train()
    loader = torch.utils.data.DataLoader(rows, batch_size=config.batch_size, shuffle=True, collate_fn=PadCollator(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    tokens, done = 0, 0
    started = time.perf_counter()
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
            done += 1
            if done == steps:
                break
    return tokens, time.perf_counter() - started


def platform(dataset, owner, steps: int) -> tuple[int, float]:
    """The worker's own code path: a queued job run by the worker task, progress and loss written to the
    database and the cancel flag read at every step."""
    from training_app.models import TrainingJob
    from training_app.services import training_job_start
    from training_app.tasks import training_job_execute

    job = training_job_start(owner=owner, dataset=dataset, config_data={"max_steps": steps, "save_steps": 100_000, "eval_examples": 0})
    training_job_execute(job.pk)
    job = TrainingJob.objects.get(pk=job.pk)
    assert job.status == "completed", job.error_message
    # tokens_per_second is measured over the training loop (hooks included), without the model load.
    return job.tokens_seen, job.tokens_seen / job.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with temporary_site():
        from datasets_app.examples import training_examples
        from inference_app.catalog import get_base_model_spec
        from inference_app.loading import pick_device
        from training_app.config import TrainingConfig

        owner, dataset = upload_sample()
        spec, plan = get_base_model_spec(), pick_device()
        config = TrainingConfig(base_model=spec.name)
        plain_tokens, plain_s = plain_loop(config, spec, plan, training_examples(dataset), args.steps)
        tuna_tokens, tuna_s = platform(dataset, owner, args.steps)
    plain_tps, tuna_tps = plain_tokens / plain_s, tuna_tokens / tuna_s
    print(
        f"device: {plan.device} ({plan.dtype_name}), {args.steps} steps of batch {config.batch_size}, {dataset.num_train} training examples"
    )
    print(f"plain transformers+peft loop: {plain_tokens} tokens in {plain_s:.1f} s = {plain_tps:.0f} tokens/s")
    print(f"LLM Tuna worker task:         {tuna_tokens} tokens in {tuna_s:.1f} s = {tuna_tps:.0f} tokens/s")
    print(f"ratio platform/plain: {tuna_tps / plain_tps:.2f}x (goal >= 0.95x)")


if __name__ == "__main__":
    main()
