"""Settings chosen from the data and the model: pure rules, no database, no model."""

from tuna_llm.autoconfig import MIN_EXAMPLES_SEEN, DataFacts, choose_settings, estimate_parameters, eval_every, validation_count

LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def small_model(train_pool: int, **facts) -> DataFacts:
    return DataFacts(train_pool=train_pool, longest_tokens=90, p95_tokens=80, parameters=135_000_000, model_type="llama", **facts)


def test_it_counts_parameters_from_a_config_alone():
    assert 7.9e9 < estimate_parameters(LLAMA_8B) < 8.1e9
    assert estimate_parameters({"model_type": "mystery"}) is None


def test_it_gives_a_small_dataset_enough_updates_to_learn():
    config, reasons = choose_settings({}, small_model(48), base_model="m")
    trained = 48 - config.eval_examples
    assert config.eval_examples == validation_count(48) == 4
    # Small data: 2 examples per update, and enough epochs to see the examples about 240 times in all.
    assert config.batch_size == 2 and "twice the updates" in reasons["batch_size"]
    assert MIN_EXAMPLES_SEEN <= trained * config.num_epochs < MIN_EXAMPLES_SEEN + trained
    updates = -(-trained // 2) * config.num_epochs
    assert (config.num_epochs, updates) == (6, 132)
    assert reasons["num_epochs"].startswith(f"{trained} examples: 6 epochs = 132 updates, because a small dataset")
    assert config.learning_rate == 1e-3 and config.lora_r == 16 and len(config.target_modules) == 7
    assert config.max_seq_length == 128 and "90 tokens" in reasons["max_seq_length"]


def test_it_keeps_three_epochs_for_a_mid_sized_dataset_and_fewer_for_a_large_one():
    mid = choose_settings({}, small_model(400), base_model="m")[0]
    assert (mid.num_epochs, mid.batch_size) == (3, 4)
    big, reasons = choose_settings({}, small_model(40_000), base_model="m")
    assert big.num_epochs == 1 and "large dataset" in reasons["num_epochs"]


def test_it_uses_the_common_rate_for_big_or_unknown_models():
    big = DataFacts(train_pool=48, parameters=estimate_parameters(LLAMA_8B), model_type="llama")
    assert choose_settings({}, big, base_model="m")[0].learning_rate == 2e-4
    unknown, reasons = choose_settings({}, DataFacts(train_pool=48), base_model="m")
    assert unknown.learning_rate == 2e-4 and "unknown" in reasons["learning_rate"]
    assert unknown.target_modules == ("q_proj", "v_proj")


def test_it_lets_the_user_override_any_choice():
    config, reasons = choose_settings({"num_epochs": 2, "learning_rate": 5e-5, "eval_examples": 0}, small_model(48), base_model="m")
    assert (config.num_epochs, config.learning_rate, config.eval_examples) == (2, 5e-5, 0)
    assert reasons["num_epochs"] == reasons["learning_rate"] == reasons["eval_examples"] == "set by you"
    assert config.eval_steps == 0


def test_it_bounds_validation_to_about_a_tenth_of_training_compute():
    # One validation pass over V examples costs about 0.42 V example-updates; at most 10% of 132 updates x 2 examples.
    every = eval_every(132, 4, 2)
    evaluations = -(-132 // every) + 2  # plus the one before training and the one at the end
    assert 3 <= evaluations and evaluations * 4 * 0.42 <= 0.1 * 132 * 2
    config, _ = choose_settings({}, small_model(48), base_model="m")
    assert config.save_steps == config.eval_steps  # a checkpoint at each validation, so the best can be kept


def test_it_cuts_only_very_long_examples():
    config, reasons = choose_settings({}, DataFacts(train_pool=100, longest_tokens=9000, p95_tokens=700, context=8192), base_model="m")
    assert config.max_seq_length == 704 and "95%" in reasons["max_seq_length"]


def test_it_keeps_the_final_weights_unless_validation_loss_rose_clearly():
    from tuna_llm.training import checkpoint_to_keep

    # Converged: a wobble far below 2% of the starting loss is noise, so the more trained weights stay.
    assert checkpoint_to_keep([(0, 1.77), (10, 0.09), (50, 0.00087), (60, 0.00138), (66, 0.00136)]) == (66, 0.00136)
    # Over-fitting: the loss rose by far more than the noise: the checkpoint before the rise is kept.
    assert checkpoint_to_keep([(0, 2.9), (10, 0.3), (20, 0.1), (30, 0.4)]) == (20, 0.1)
    # A continued run has no "before training" point: its own highest loss sets the scale.
    assert checkpoint_to_keep([(12, 0.5), (24, 0.2), (36, 0.21)]) == (36, 0.21)
    assert checkpoint_to_keep([(0, 1.0)]) is None
