"""The auto settings on several training processes: the batch chosen is per process, so that the examples each update
learns from (the effective batch) and the number of updates stay what one process would run. Pure rules."""

from dataclasses import replace

import pytest

from tuna_llm.autoconfig import DataFacts, choose_settings, train_processes, updates_per_epoch
from tuna_llm.training import steps_per_epoch, total_steps
from tuna_llm.training_config import TrainingConfig, build_config


def facts(train_pool: int, processes: int = 1) -> DataFacts:
    return DataFacts(
        train_pool=train_pool, longest_tokens=90, p95_tokens=80, parameters=135_000_000, model_type="llama", processes=processes
    )


@pytest.mark.parametrize(("pool", "aim"), [(48, 2), (400, 4)])
def test_it_plans_the_same_updates_of_the_same_effective_batch_on_one_and_on_two_processes(pool, aim):
    one, one_reasons = choose_settings({}, facts(pool), base_model="m")
    two, two_reasons = choose_settings({}, facts(pool, processes=2), base_model="m")
    assert (one.processes, two.processes) == (1, 2)
    assert (one.batch_size, two.batch_size) == (aim, aim // 2)  # per process
    assert one.effective_batch == two.effective_batch == aim
    trained = pool - one.eval_examples
    same = ("num_epochs", "eval_examples", "eval_steps", "save_steps", "learning_rate", "lora_r", "max_seq_length")
    assert {k: getattr(one, k) for k in same} == {k: getattr(two, k) for k in same}
    assert total_steps(one, trained) == total_steps(two, trained) > 0
    assert one_reasons["processes"] == "one process on this server (TUNA_TRAIN_PROCESSES)"
    assert two_reasons["processes"].startswith("2 processes on this server (TUNA_TRAIN_PROCESSES)")
    assert two_reasons["batch_size"].endswith(f": {aim // 2} on each of 2 processes")


def test_it_gives_each_process_at_least_one_example_and_says_what_that_makes():
    four, reasons = choose_settings({}, facts(48, processes=4), base_model="m")
    assert (four.batch_size, four.effective_batch) == (1, 4)  # 2 per update cannot be split four ways
    assert "each of the 4 processes takes at least 1: 4 per update" in reasons["batch_size"]
    three, reasons = choose_settings({}, facts(400, processes=3), base_model="m")
    assert (three.batch_size, three.effective_batch) == (1, 3)  # the nearest to 4 that 3 processes share evenly
    assert "1 on each, 3 per update" in reasons["batch_size"]
    # The validation interval follows the examples per update, whatever the processes.
    assert three.eval_steps == choose_settings({"batch_size": 3}, facts(400), base_model="m")[0].eval_steps


def test_it_takes_the_users_batch_size_per_process():
    config, reasons = choose_settings({"batch_size": 4, "gradient_accumulation_steps": 2}, facts(400, processes=2), base_model="m")
    assert (config.batch_size, config.processes, config.effective_batch) == (4, 2, 16)
    assert reasons["batch_size"] == "set by you"
    # Updates per epoch: each process takes its share of the 380 trained examples in batches of 4, two batches an update.
    assert updates_per_epoch(380, 4, 2, 2) == steps_per_epoch(config, 380) == 24  # ceil(380 / 8) = 48 batches


def test_it_keeps_the_processes_of_the_run_a_continued_run_goes_on_from():
    parent, _ = choose_settings({}, facts(400, processes=2), base_model="m")
    same = {k: v for k, v in parent.to_dict().items() if k not in ("base_model", "eval_steps", "save_steps")}
    child, reasons = choose_settings({**same, "num_epochs": 1}, facts(400, processes=4), base_model="m")
    assert (child.processes, child.batch_size, child.effective_batch) == (2, parent.batch_size, parent.effective_batch)
    assert reasons["processes"] == "the same processes as the run it goes on from"
    # A row saved before several processes existed reads as one process.
    assert TrainingConfig.from_dict({k: v for k, v in parent.to_dict().items() if k != "processes"}).processes == 1
    assert replace(parent, processes=1).effective_batch == parent.batch_size


def test_it_counts_the_servers_processes_per_machine_times_machines():
    assert train_processes("1") == 1 and train_processes(3) == 3
    assert train_processes("2", nodes=3) == 6
    import torch

    assert train_processes("auto") == (torch.cuda.device_count() if torch.cuda.is_available() else 1)


def test_it_refuses_processes_and_effective_batch_as_settings_saying_who_chooses_them():
    result = build_config(
        {"processes": 4, "effective_batch": 8, "colour": 1}, catalog={"m": None}, default_model="m", model_dirs={"m": None}
    )
    assert result.explicit is None
    assert result.errors["processes"].startswith("Chosen by the server (TUNA_TRAIN_PROCESSES), not per job; leave it out.")
    assert "batch_size per process × processes × gradient_accumulation_steps" in result.errors["effective_batch"]
    assert result.errors["colour"].startswith("Unknown setting.")


def test_it_plans_preference_tuning_on_one_process_with_the_pairs_per_update_of_the_servers_processes():
    from tuna_llm.preference import preference_settings

    one_start, _ = choose_settings({}, facts(12), base_model="m")
    two_start, _ = choose_settings({}, facts(12, processes=2), base_model="m")
    one, _ = preference_settings(one_start, 12)
    two, reasons = preference_settings(two_start, 12)
    # training_app.distributed trains supervised jobs only on several processes: a preference job runs on one.
    assert (one.processes, two.processes) == (1, 1)
    assert one.batch_size == two.batch_size == one.effective_batch == two.effective_batch == 2
    assert one.num_epochs == two.num_epochs and total_steps(one, 12) == total_steps(two, 12)
    assert reasons["processes"] == "one process: preference tuning does not train on several"
