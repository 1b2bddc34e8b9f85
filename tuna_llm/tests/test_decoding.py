"""Precision, continuous batching, row-wise attention and the answer-token loss, on the real embedded model."""

import pytest
import torch

from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import load_tokenizer_and_model, native_bf16, pick_device
from tuna_llm.prompting import render_chat
from tuna_llm.serving import packing
from tuna_llm.serving.batching import BatchingEngine, GenerationRequest, generate_chat
from tuna_llm.serving.decoding import DecodeBatch, Row
from tuna_llm.serving.registry import registry
from tuna_llm.training import PadCollator, answer_tokens_loss, tokenize_examples

pytestmark = [pytest.mark.django_db, pytest.mark.model]


def chat(loaded, prompt: str) -> str:
    return render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def test_it_picks_bf16_where_the_hardware_computes_it_natively_and_obeys_the_setting(settings):
    has_native = torch.cpu.get_capabilities().get("avx512_bf16", False) or torch.cpu.get_capabilities().get("amx_tile", False)
    assert (native_bf16() is not None) == (has_native or torch.cuda.is_bf16_supported(including_emulation=False))
    auto = pick_device("auto")
    assert auto.dtype_name == ("bfloat16" if native_bf16() else "float32")
    assert auto.reason  # said in words on the usage and evaluation pages
    assert pick_device("fp32").dtype == torch.float32 and "TUNA_PRECISION=fp32" in pick_device("fp32").describe()
    assert pick_device("bf16").dtype == torch.bfloat16
    settings.TUNA_PRECISION = "fp32"
    assert pick_device().precision == "fp32"  # the setting, read live
    with pytest.raises(ValueError, match="TUNA_PRECISION must be one of auto, bf16, fp32"):
        pick_device("fp16")


def test_it_serves_in_the_deployment_precision():
    loaded = registry.get()
    assert loaded.model.dtype == pick_device().dtype
    assert loaded.plan.precision == pick_device().precision


def test_it_lets_a_request_join_a_running_batch_at_the_next_step():
    loaded = registry.get()
    long_text, short_text = chat(loaded, "Count from one to fifty, in words."), chat(loaded, "Say hello.")
    alone = [
        generate_chat(loaded, [{"role": "user", "content": p}], max_new_tokens=n).text
        for p, n in (("Count from one to fifty, in words.", 40), ("Say hello.", 6))
    ]
    engine = BatchingEngine(loaded, window_s=0.0)
    long = GenerationRequest(text=long_text, max_new_tokens=40)
    short = GenerationRequest(text=short_text, max_new_tokens=6)
    engine.submit(long)
    first = long.deltas.get(timeout=60)  # the long request is decoding
    engine.submit(short)
    assert short.done.wait(60)
    assert not long.done.is_set()  # the short one ended while the long one still decoded: it did not wait for it
    assert long.done.wait(120)
    assert engine.batches_run == 2 and engine.largest_batch == 2  # two admissions into one running batch
    assert short.result.queue_ms < long.result.latency_ms
    assert [long.result.text, short.result.text] == alone
    assert long.result.text.startswith(first.strip())


def test_it_keeps_padding_out_of_a_row_s_attention():  # in the deployment's precision
    """A row padded on the left (batched with a longer prompt) gets bit-identical logits to the same row alone."""
    loaded = registry.get()
    short = loaded.tokenizer(chat(loaded, "Hi"), add_special_tokens=False)["input_ids"]
    long = loaded.tokenizer(chat(loaded, "Please write a long and detailed answer about the sea."), add_special_tokens=False)["input_ids"]
    captured = []

    def choose(logits, rows):
        captured.append(logits.clone())
        return logits.argmax(dim=-1).tolist()

    alone, together = DecodeBatch(loaded, loaded.tokenizer.pad_token_id), DecodeBatch(loaded, loaded.tokenizer.pad_token_id)
    alone._choose = together._choose = choose
    alone.admit([Row(short)])
    together.admit([Row(long), Row(short)])
    assert len(long) > len(short)
    assert torch.equal(captured[0][0], captured[1][1])


@pytest.mark.parametrize("q_length", [1, 7])
def test_it_computes_each_row_of_an_unpadded_batch_as_it_computes_the_row_alone(q_length):
    """No mask (no padding): each row still gets the very call it gets alone. With two threads PyTorch's kernel
    shares out a batch's work otherwise, and on an AVX2-only AMD EPYC a row beside a copy of itself differed."""
    from types import SimpleNamespace

    from tuna_llm.serving.rowwise import rows_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 9, q_length, 64, generator=generator)
    key, value = torch.randn(3, 3, 37, 64, generator=generator), torch.randn(3, 3, 37, 64, generator=generator)
    query[1], key[1], value[1] = query[0], key[0], value[0]  # a lone row's ghost copy
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    together, _ = rows_attention(module, query, key, value, None, scaling=0.125)
    for row in range(3):
        alone, _ = rows_attention(module, query[row : row + 1], key[row : row + 1], value[row : row + 1], None, scaling=0.125)
        assert torch.equal(together[row], alone[0]), row
    assert together.shape == (3, q_length, 9, 64)


def test_it_computes_the_answer_token_loss_as_the_model_does():
    from peft import get_peft_model

    from tuna_llm.training import lora_config
    from tuna_llm.training_config import TrainingConfig

    spec = get_base_model_spec()
    tokenizer, model = load_tokenizer_and_model(spec, pick_device("fp32"))
    config = TrainingConfig(base_model=spec.name, target_modules=("q_proj", "v_proj"))
    model = get_peft_model(model, lora_config(config))
    examples = [
        [{"role": "user", "content": f"Order {i}: {n} mugs"}, {"role": "assistant", "content": f'{{"item": "mug", "qty": {n}}}'}]
        for i, n in enumerate((2, 7, 11))
    ]
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_examples(tokenizer, examples, 256))
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert answer_tokens < int(batch["attention_mask"].sum())  # the prompt positions are left out
    with torch.no_grad():
        assert answer_tokens_loss(model.get_base_model(), batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        items = torch.tensor(answer_tokens * 2)  # as with gradient accumulation over two batches
        ours = answer_tokens_loss(model.get_base_model(), batch, items).item()
        assert ours == pytest.approx(model(**batch, num_items_in_batch=items).loss.item(), rel=1e-5)


def test_it_computes_the_training_logits_in_fp32_on_a_bf16_model():
    """bf16 training: the output layer's product in fp32 from the same bf16 values, not rounded to bf16; the
    gradient reaches the hidden states; a frozen output layer's fp32 weight is cast once."""
    from tuna_llm.training import fp32_logits

    _, model = load_tokenizer_and_model(get_base_model_spec(), pick_device("bf16"))
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)  # frozen, as under LoRA
    torch.manual_seed(0)
    hidden = torch.randn(6, head.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs it
        logits = fp32_logits(head, hidden)
        rounded = head(hidden).float()
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(hidden.detach().float(), head.weight.float()))
    assert not torch.equal(logits, rounded) and torch.allclose(logits, rounded, atol=0.25)
    logits.logsumexp(-1).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    first = head._tuna_fp32_weight[1]
    fp32_logits(head, hidden.detach())
    assert head._tuna_fp32_weight[1] is first  # kept, not cast again on every step


def test_it_trains_with_attention_computed_in_fp32_on_a_bf16_cpu():
    """bf16 training on CPU: the attention of bf16 states computed in fp32 (PyTorch's bf16 kernel is slow
    backwards), its output bf16, gradients back to the bf16 states; fp32 training keeps transformers' default."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tuna_llm.training import FP32_ATTENTION, fp32_attention, load_for_training

    plan = pick_device("bf16")
    if plan.device != "cpu":
        pytest.skip("on a GPU, training keeps transformers' attention")
    tokenizer, model = load_for_training(get_base_model_spec(), plan)
    assert model.config._attn_implementation == FP32_ATTENTION
    _, fp32_model = load_for_training(get_base_model_spec(), pick_device("fp32"))
    assert fp32_model.config._attn_implementation == "sdpa"
    module = model.model.layers[0].self_attn
    torch.manual_seed(0)
    query = torch.randn(2, 9, 12, 64, dtype=torch.bfloat16, requires_grad=True)
    key, value = torch.randn(2, 3, 12, 64, dtype=torch.bfloat16), torch.randn(2, 3, 12, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fp32_attention(module, query, key, value, None, scaling=module.scaling)
    expected, _ = sdpa_attention_forward(module, query.detach().float(), key.float(), value.float(), None, scaling=module.scaling)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))
    out.float().sum().backward()
    assert query.grad is not None and query.grad.dtype == torch.bfloat16 and query.grad.abs().sum() > 0
    batch = PadCollator(0)(tokenize_examples(tokenizer, [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]], 64))
    assert torch.isfinite(model(**batch).loss)  # the whole model runs with it


def test_it_states_the_precision_on_the_usage_page_and_records_it_per_call(alice_api, alice_client):
    from inference_app.models import UsageLog

    answer = alice_api.post("/api/inference", {"model_id": "base:smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 4}, format="json")
    assert answer.status_code == 200, answer.content
    assert UsageLog.objects.get().precision == pick_device().precision
    page = alice_client.get("/usage").content.decode()
    assert f"This deployment computes in <strong>{pick_device().describe()}</strong>" in page


def test_it_computes_held_out_loss_in_batches_as_one_example_at_a_time():
    from datasets_app.examples import SAMPLE_PATH, file_examples
    from tuna_llm.evaluation import answer_loss

    loaded = registry.get()
    examples = file_examples(SAMPLE_PATH)[:10]  # lengths differ: rows are padded on the right
    batched = answer_loss(loaded, examples, adapter=None, batch_size=8)
    assert batched == pytest.approx(answer_loss(loaded, examples, adapter=None, batch_size=1), rel=1e-4)


def test_it_computes_the_held_out_loss_from_fp32_logits_in_a_bf16_deployment():
    """The evaluation's held-out loss is training's computation (the output layer in fp32 at the answer positions),
    not the loss of logits rounded to bf16."""
    from datasets_app.examples import SAMPLE_PATH, file_examples
    from tuna_llm.evaluation import answer_loss
    from tuna_llm.serving.registry import load_for_serving
    from tuna_llm.training import tokenize_example

    loaded = load_for_serving(get_base_model_spec(), pick_device("bf16"))
    examples = file_examples(SAMPLE_PATH)[:4]
    rows = sorted((tokenize_example(loaded.tokenizer, m, 1024, final_turn_only=True) for m in examples), key=lambda r: len(r["input_ids"]))
    batch = {
        key: value.to(loaded.device) for key, value in PadCollator(loaded.tokenizer.pad_token_id)(rows).items()
    }  # as answer_loss has it
    head = loaded.model.get_output_embeddings()
    with torch.inference_mode():
        hidden = loaded.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        answers = hidden[:, :-1][keep]
        fp32 = torch.nn.functional.cross_entropy(torch.nn.functional.linear(answers.float(), head.weight.float()), targets[keep])
        rounded = torch.nn.functional.cross_entropy(head(answers).float(), targets[keep])
    measured = answer_loss(loaded, examples, adapter=None)
    assert measured == pytest.approx(float(fp32), rel=1e-5)
    assert measured != pytest.approx(float(rounded), rel=1e-4)
    assert "_tuna_fp32_weight" not in head.__dict__  # a serving model keeps no second copy of its output layer


def logging_batch(loaded, log: list) -> DecodeBatch:
    """A DecodeBatch that appends its first row's logits to ``log`` at every token (greedy)."""
    batch = DecodeBatch(loaded, loaded.tokenizer.pad_token_id)
    batch._choose = lambda logits, rows: (log.append(logits[0].clone()), logits.argmax(dim=-1).tolist())[1]
    return batch


@pytest.mark.parametrize("layers", ["serving", "torch"])
def test_it_decodes_a_lone_row_as_it_decodes_it_in_a_batch(layers, trained_adapter):
    """With torch's own linear layers a lone row is held twice, so that it goes through the kernels a batch uses
    (tuna_llm.serving.rowwise). The serving layers (tuna_llm.serving.packing, on CPU) make that copy inside each product, the
    adapters' LoRA layers included, so there the lone row is held once. Either way it decodes, base or
    fine-tuned, to the tokens it gets beside another row."""
    from tuna_llm.serving import rowwise
    from tuna_llm.serving.registry import LoadedBaseModel

    spec, plan = get_base_model_spec(), pick_device()
    if layers == "serving":
        if not packing.applies(plan):
            pytest.skip("no serving layers on this machine")
        loaded = registry.get()
    else:
        loaded = LoadedBaseModel(spec, plan, *load_tokenizer_and_model(spec, plan, attention=rowwise.register()))
    ids = loaded.tokenizer(chat(loaded, "Name a colour."), add_special_tokens=False)["input_ids"]
    other = loaded.tokenizer(chat(loaded, "Write two long sentences about rivers."), add_special_tokens=False)["input_ids"]
    loaded.attach_adapter("lone-test", trained_adapter)
    try:
        assert loaded.lone_rows_exact == (layers == "serving")
        if layers == "serving":  # the adapter's LoRA layers were made serving layers on attach
            assert packing.products_row_stable(loaded.model)
        ghost = layers == "torch"
        for adapter in (None, "lone-test"):
            captured = {"lone": [], "pair": []}
            lone, pair = logging_batch(loaded, captured["lone"]), logging_batch(loaded, captured["pair"])
            a = lone.admit([Row(ids, adapter=adapter)])
            assert len(lone) == 1 and len(lone.slots) == lone.mask.shape[0] == (2 if ghost else 1)
            b = pair.admit([Row(ids, adapter=adapter), Row(other, adapter=adapter)])
            tokens_lone, tokens_pair = [a[0]], [b[0]]
            for _ in range(12):
                a, b = lone.step(a), pair.step(b)
                tokens_lone.append(a[0])
                tokens_pair.append(b[0])
            assert tokens_lone == tokens_pair, adapter
            if not ghost:  # the serving layers: the very logits
                assert torch.equal(torch.stack(captured["lone"]), torch.stack(captured["pair"])), adapter
            pair.drop([pair.rows[1]])  # the pair's second row ends: the first goes on alone
            assert len(pair.slots) == (2 if ghost else 1) and pair.slots[0] is pair.slots[-1]
            assert pair.step([b[0]]) == lone.step([a[0]])
    finally:
        loaded.detach_adapter("lone-test")


@pytest.mark.parametrize(
    "precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(native_bf16() is None, reason="no native bf16"))]
)
def test_it_gives_a_row_the_same_logits_alone_and_in_batches_of_every_size(precision):
    """Bit-equal logits, prefill and decoding steps, for a row alone and beside 1 to 3 others (MKL's fp32 products,
    tried on an Intel CPU, differed by 2e-5 beside three others)."""
    from tuna_llm.serving.registry import load_for_serving

    loaded = load_for_serving(get_base_model_spec(), pick_device(precision))
    prompts = [
        "Name a colour.",
        "Write two long sentences about rivers.",
        "Hi",
        "Explain the water cycle to a ten-year-old, with many examples.",
    ]
    ids = [loaded.tokenizer(chat(loaded, p), add_special_tokens=False)["input_ids"] for p in prompts]

    def first_row_logits(count):
        captured = []
        batch = logging_batch(loaded, captured)
        tokens = batch.admit([Row(i) for i in ids[:count]])
        for _ in range(5):
            tokens = batch.step(tokens)
        return torch.stack(captured)

    alone = first_row_logits(1)
    for count in (2, 3, 4):
        assert torch.equal(first_row_logits(count), alone), count


def test_it_switches_adapter_layers_only_when_the_adapter_in_use_changes(trained_adapter):
    """peft's on/off switch walks every module: decoding steps of one adapter (or of the base) must not pay for it
    on every token, and the answers must still come from the adapter asked for."""
    loaded = registry.get()
    ids = loaded.tokenizer(chat(loaded, "Name a colour."), return_tensors="pt", add_special_tokens=False)["input_ids"]

    def last_logits(adapter):
        with loaded.using(adapter) as model, torch.inference_mode():
            return model(input_ids=ids).logits[0, -1].clone()

    base_alone = last_logits(None)
    loaded.attach_adapter("switch-test", trained_adapter)
    try:
        tuner = loaded.model.base_model
        walks = []
        walk = tuner._enable_adapter_layers
        tuner._enable_adapter_layers = lambda enabled=True: (walks.append(enabled), walk(enabled))[1]
        tuned = [last_logits("switch-test"), last_logits("switch-test")]
        base = [last_logits(None), last_logits(None)]
        again = last_logits("switch-test")
        with loaded.using_per_row([None, "switch-test"]) as (model, routing), torch.inference_mode():
            mixed = model(input_ids=ids.repeat(2, 1), **routing).logits[:, -1]
        assert walks == [True, False, True]  # once per change, not once per call
        assert torch.equal(base[0], base_alone) and torch.equal(base[1], base_alone)
        assert not torch.equal(tuned[0], base_alone) and torch.equal(tuned[1], tuned[0]) and torch.equal(again, tuned[0])
        if loaded.plan.precision == "fp32":
            assert torch.allclose(mixed[0], base_alone, atol=1e-4) and torch.allclose(mixed[1], tuned[0], atol=1e-4)
        else:  # bf16: peft's per-row path rounds the adapter's output to bf16 before adding it, one rounding more
            gap = lambda a, b: (a.float() - b.float()).abs().max()  # noqa: E731
            assert gap(mixed[0], base_alone) < gap(mixed[0], tuned[0]) and gap(mixed[1], tuned[0]) < gap(mixed[1], base_alone)
    finally:
        loaded.detach_adapter("switch-test")


def oneDNN_precisions():
    """The precisions whose serving layers go through oneDNN here (fp32 on any CPU; bf16 where it is native)."""
    return [
        pytest.param(
            p, marks=pytest.mark.skipif(not packing.applies(pick_device(p)), reason=f"{p}: no oneDNN serving layers on this machine")
        )
        for p in ("fp32", "bf16")
    ]


@pytest.mark.parametrize("precision", oneDNN_precisions())
def test_it_packs_serving_weights_for_the_cpu_with_the_plain_weights_results(precision, trained_adapter):
    """Packed weights (tuna_llm.serving.packing) compute the very products the plain weights do: prefill and decoding
    logits bit-equal, with and without a LoRA adapter wrapped around the packed layers."""
    from tuna_llm.serving.packing import ProductGroup, serving_linear_class
    from tuna_llm.serving.registry import load_for_serving

    spec, plan = get_base_model_spec(), pick_device(precision)
    plain, packed = load_for_serving(spec, plan, pack=False), load_for_serving(spec, plan, pack=True)
    serving_type = serving_linear_class()
    for loaded, pack in ((packed, True), (plain, False)):
        layers = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
        assert layers and all(type(m) is serving_type for m in layers)  # every projection and the output layer
        assert all(m.packed == pack for m in layers)  # its own packed weight or its group's
        assert loaded.model.dtype == plan.dtype
        attention, mlp = loaded.model.model.layers[0].self_attn, loaded.model.model.layers[0].mlp
        for members in ([attention.q_proj, attention.k_proj, attention.v_proj], [mlp.gate_proj, mlp.up_proj]):
            # One product for the layers that read the same input, where it gives their own results on this CPU.
            grouped = pack and ProductGroup(members).agrees()
            assert all(m._group is members[0]._group for m in members) and (members[0]._group is not None) == grouped
        assert attention.o_proj._group is None and mlp.down_proj._group is None
    ids = plain.tokenizer(chat(plain, "Name three rivers."), add_special_tokens=False)["input_ids"]

    def decoded(loaded, adapter):
        captured = []
        batch = DecodeBatch(loaded, loaded.tokenizer.pad_token_id)
        batch._choose = lambda logits, rows: (captured.append(logits.clone()), logits.argmax(dim=-1).tolist())[1]
        tokens = batch.admit([Row(ids, adapter=adapter), Row(ids[:-3], adapter=adapter)])
        for _ in range(4):
            tokens = batch.step(tokens)
        return torch.stack(captured)

    assert torch.equal(decoded(packed, None), decoded(plain, None))
    for loaded in (plain, packed):
        loaded.attach_adapter("packing-test", trained_adapter)
    assert torch.equal(decoded(packed, "packing-test"), decoded(plain, "packing-test"))
    assert not torch.equal(decoded(packed, "packing-test"), decoded(packed, None))  # the adapter is in the path


def attention_block(dtype) -> torch.nn.Module:
    """A module with a block's projections, by the names the layers that read the same input have."""
    block = torch.nn.Module()
    for name, size in (("q_proj", 64), ("k_proj", 16), ("v_proj", 16), ("o_proj", 64)):
        setattr(block, name, torch.nn.Linear(64, size, bias=False).to(dtype))
    return block


@pytest.mark.parametrize("precision", oneDNN_precisions())
def test_it_makes_one_product_of_the_layers_that_read_the_same_input_where_it_gives_their_own_results(precision, monkeypatch):
    import copy

    from tuna_llm.serving.packing import ProductGroup, prepare_linear_layers, products_row_stable

    dtype = pick_device(precision).dtype
    torch.manual_seed(0)
    apart, grouped = attention_block(dtype), attention_block(dtype)
    grouped.load_state_dict(apart.state_dict())
    unmade = copy.deepcopy(apart)
    assert prepare_linear_layers(apart, pack=False) == 4 and prepare_linear_layers(grouped, pack=True) == 4
    assert products_row_stable(apart) and products_row_stable(grouped)
    if not ProductGroup([apart.q_proj, apart.k_proj, apart.v_proj]).agrees():
        pytest.skip("this CPU's product of the three rounds otherwise than their own: they stay apart (tested below)")
    q, k, v = grouped.q_proj, grouped.k_proj, grouped.v_proj
    assert q._group is k._group is v._group is not None and grouped.o_proj._group is None and grouped.o_proj.packed
    products = []
    monkeypatch.setattr(
        ProductGroup, "_product", lambda self, rows, real=ProductGroup._product: products.append(rows.shape[0]) or real(self, rows)
    )
    with torch.inference_mode():
        for x in (torch.randn(3, 1, 64, dtype=dtype), torch.randn(1, 1, 64, dtype=dtype), torch.randn(2, 70, 64, dtype=dtype)):
            products.clear()
            for name in ("q_proj", "k_proj", "v_proj"):
                assert torch.equal(getattr(grouped, name)(x), getattr(apart, name)(x)), name
            assert len(products) == (1 if x.shape[1] == 1 else 3)  # one call per input (a sequence: 140 rows, 3 calls of 64)
    # A CPU where the group's product would round otherwise than its members' own: they stay apart, each packed.
    monkeypatch.setattr(ProductGroup, "_product", lambda self, rows, real=ProductGroup._product: real(self, rows) + 1)
    prepare_linear_layers(unmade, pack=True)
    assert all(getattr(unmade, name)._group is None and getattr(unmade, name).packed for name in ("q_proj", "k_proj", "v_proj"))
    # A product outside the serving layers (GPT-2's Conv1D): a lone row would need its copy again.
    from transformers.pytorch_utils import Conv1D

    unmade.c_proj = Conv1D(64, 64).to(dtype)
    assert not products_row_stable(unmade)


@pytest.mark.parametrize("precision", oneDNN_precisions())
def test_it_computes_a_packed_layer_the_plain_way_for_gradients_and_refuses_a_changed_weight(precision):
    from tuna_llm.serving.packing import prepare_linear_layers

    dtype = pick_device(precision).dtype
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=True)).to(dtype)
    plain = torch.nn.Linear(64, 32).to(dtype)
    plain.load_state_dict(model[0].state_dict())
    assert prepare_linear_layers(model, pack=True) == 1
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    model(x).sum().backward()  # gradients: the plain path (the packed kernel has none)
    assert x.grad is not None and model[0].weight.grad is not None
    with torch.inference_mode():
        step = x.detach().unsqueeze(1)  # [rows, 1 position, features]: a decoding step, one call as it comes
        if precision == "bf16":  # torch's bf16 product on CPU is oneDNN's too
            assert torch.equal(model(step), plain(step))
        else:  # torch's fp32 product on CPU is MKL's, which rounds otherwise
            assert torch.allclose(model(step), plain(step), atol=1e-5)
        model[0].weight.add_(1.0)  # e.g. an adapter merged into the weights: the packed copy would be stale
        with pytest.raises(RuntimeError, match="changed after packing"):
            model(x.detach())


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("precision", oneDNN_precisions())
def test_it_gives_each_row_the_same_product_whatever_it_is_computed_with(precision, pack):
    """On an AMX CPU oneDNN's bf16 result for a row depended on how many rows the call had, and in fp32 a call
    of one row rounds apart (tuna_llm.serving.packing): a serving layer's row results must not depend on the rows
    around them, in a sequence or in a decoding step, whatever their number."""
    from tuna_llm.serving.registry import load_for_serving

    plan = pick_device(precision)
    loaded = load_for_serving(get_base_model_spec(), plan, pack=pack)
    model = loaded.model.model
    torch.manual_seed(0)
    with torch.inference_mode():
        block = model.layers[0]  # q_proj and up_proj: a group's product where weights are packed
        for layer in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj, loaded.model.lm_head):
            rows = torch.randn(1, 300, layer.in_features, dtype=plan.dtype)
            whole = layer(rows)[0]
            # One position of one row is a decoding step's shape, computed as one (a one-token prompt; see the README).
            for start, end in ((0, 33), (5, 69), (40, 42), (100, 300), (7, 130)):
                assert torch.equal(layer(rows[:, start:end])[0], whole[start:end]), (start, end)
            steps = rows[0, :40].unsqueeze(1)  # 40 rows, one position each
            alone = layer(steps)
            for start, end in ((0, 2), (3, 11), (0, 16), (0, 17), (20, 40), (38, 40), (5, 6)):
                assert torch.equal(layer(steps[start:end]), alone[start:end]), (start, end)
