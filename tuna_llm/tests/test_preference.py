"""DPO (TRL) on the real embedded model: what a step computes."""

import pytest
import torch
from transformers import TrainerCallback

from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import pick_device
from tuna_llm.preference import PreferencePair, preference_settings, run_preference_training
from tuna_llm.training_config import TrainingConfig

pytestmark = [pytest.mark.django_db, pytest.mark.model]


class ScoredPositions(TrainerCallback):
    """Counts, per forward pass, the positions in the batch (the embedding layer's input) and the positions whose
    next token the output layer scored (the rows TRL's fused LM head hands its log-probability function)."""

    def __init__(self, log_prob_function) -> None:
        self.log_prob_function = log_prob_function
        self.batch_positions: list[int] = []
        self.scored: list[int] = []
        self.labels_ok = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: self.batch_positions.append(inputs[0].numel()))

    def log_probs(self, hidden, weight, bias, labels, *rest):
        self.scored.append(hidden.shape[0])
        self.labels_ok &= bool((labels >= 0).all())
        return self.log_prob_function(hidden, weight, bias, labels, *rest)


def test_it_scores_only_the_answer_positions_in_a_dpo_step_on_any_device(trained_adapter, tmp_path, monkeypatch):
    from trl.trainer import utils as trl_utils

    seen = ScoredPositions(trl_utils._ChunkedLogProbFunction.apply)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", seen.log_probs)
    spec = get_base_model_spec()
    pairs = [
        PreferencePair(
            messages=[
                {
                    "role": "user",
                    "content": f"Which team handles ticket {i}: my card was charged twice for order {i * 37}, please refund it.",
                }
            ],
            chosen="billing",
            rejected="shipping",
        )
        for i in range(2)
    ]
    config, _ = preference_settings(TrainingConfig(base_model=spec.name, max_seq_length=160), len(pairs), epochs=1)
    result = run_preference_training(
        config, spec=spec, plan=pick_device(), pairs=pairs, init_adapter=trained_adapter, output_dir=tmp_path, extra_callbacks=[seen]
    )

    assert result.global_step == 1 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(result.final_loss))
    # Two passes (the policy and the reference), each over the 2 chosen and 2 rejected sequences; each scores its
    # answers' few tokens (a one-word answer and the end of the turn), not the ~30-token prompts and the padding.
    assert len(seen.scored) == len(seen.batch_positions) == 2
    for scored, positions in zip(seen.scored, seen.batch_positions, strict=True):
        assert 4 <= scored <= 4 * 6 < positions / 3
    assert seen.labels_ok  # only labelled positions: none clamped from -100
    # The switch is put back when the run ends: TRL's own choice again (Triton devices only).
    assert trl_utils._use_triton(torch.device("cpu")) is False
