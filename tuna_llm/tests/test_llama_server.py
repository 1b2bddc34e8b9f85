"""llama-server started and supervised by the product (tuna_llm.serving.llama_server), spoken to through the
OpenAI-protocol client (openai_engine): real pinned llama-server processes, the embedded model's f16 GGUF and
LoRA GGUFs converted by the pinned converter, llama.cpp called directly (llama-cpp-python) as the reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from inference_app.engines import BASE_GGUF
from tests.support import free_port, process_exists, wait_for
from tuna_llm import gguf_export, llama_tools
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.loading import prepare_embedded_model
from tuna_llm.serving import llama_server
from tuna_llm.serving.engine import Adapter, CallSpec, RequestInvalid, result_of
from tuna_llm.serving.llama_server import LlamaServer, LlamaServerPool, launched
from tuna_llm.serving.openai_engine import Endpoint, EngineRefused, EngineUnavailable, OpenAIEngine, OpenAIRequest

pytestmark = [pytest.mark.model, pytest.mark.process]

RANK = 8
CTX = 512
PROMPT = [{"role": "user", "content": "Name a colour."}]
LONG = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return Path(prepare_embedded_model(get_base_model_spec()))


@pytest.fixture(scope="module")
def base_gguf(base_dir, shared_gguf_dir) -> Path:
    """The embedded model's f16 GGUF where the exports keep it (converted once per test session)."""
    path = shared_gguf_dir / get_base_model_spec().name / BASE_GGUF
    if not path.is_file():
        gguf_export.convert_model(base_dir, path, "f16")
    return path


@pytest.fixture(scope="module")
def lora_ggufs(base_dir, tmp_path_factory) -> list[Path]:
    """Three distinct LoRA GGUFs (random, non-zero weights: each one changes the answer in its own way)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("loras")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    out = []
    for index in range(3):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
        adapter = folder / f"adapter-{index}"
        model.save_pretrained(str(adapter))
        out.append(gguf_export.convert_lora(adapter, base_dir, folder / f"lora-{index}.gguf"))
    return out


def ask(engine, messages=PROMPT, lora: Path | None = None, max_tokens: int = 12):
    spec = CallSpec(messages=list(messages), max_tokens=max_tokens, adapter=Adapter(lora.stem, lora) if lora else None)
    return engine.prepare(spec)


def direct_answer(base_gguf: Path, lora: Path | None, prompt: str, max_tokens: int) -> str:
    """llama.cpp called directly (llama-cpp-python, in this process) on the same rendered prompt, greedy."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=CTX, n_threads=2, verbose=False)
    try:
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"].strip()
    finally:
        llm.close()


def test_it_answers_greedily_with_each_call_s_own_lora_as_llama_cpp_called_directly(base_gguf, lora_ggufs):
    loras = lora_ggufs[:2]
    with launched(base_gguf, loras, parallel=2, ctx_per_slot=CTX) as engine:
        assert engine.describe().name == "llama.cpp" and engine.describe().precision == "gguf"
        requests = [ask(engine, lora=lora) for lora in (None, *loras)]
        answers = [result_of(engine.submit(request)) for request in requests]
        for request, answer, lora in zip(requests, answers, (None, *loras), strict=True):
            assert answer.text == direct_answer(base_gguf, lora, request.prompt, 12), lora
            assert answer.prompt_tokens == request.prompt_tokens > 0 and 0 < answer.completion_tokens <= 12
            assert answer.finish_reason in ("stop", "length") and answer.compute_ms > 0 and answer.latency_ms > 0
            assert answer.queue_ms >= 0
        assert len({answer.text for answer in answers}) == 3  # each LoRA changes the answer: applied per call

        # Submitted together, they decode in one batch; each answer is still the one it gets alone.
        together = [result_of(handle) for handle in engine.submit_all(requests)]
        assert [a.text for a in together] == [a.text for a in answers]


def test_it_refuses_what_the_engine_refuses_with_its_message_and_an_unknown_lora(base_gguf, lora_ggufs):
    with launched(base_gguf, lora_ggufs[:1], parallel=1, ctx_per_slot=CTX) as engine:
        too_long = OpenAIRequest(prompt="word " * (CTX * 2), prompt_tokens=0, max_tokens=4)  # past prepare's own check
        with pytest.raises(EngineRefused) as refused:
            result_of(engine.submit(too_long))
        assert "llama.cpp engine refused the request" in str(refused.value) and "context" in str(refused.value)
        with pytest.raises(RequestInvalid, match="lora-2.gguf is not loaded"):
            result_of(engine.submit(ask(engine, lora=lora_ggufs[2])))
        with pytest.raises(RequestInvalid, match="context holds"):
            engine.prepare(CallSpec(text="word " * (CTX * 2), max_tokens=4))


def test_it_fails_the_calls_in_flight_when_llama_server_dies_and_answers_the_next_from_its_restart(base_gguf):
    server = LlamaServer(base_gguf, parallel=2, ctx_per_slot=CTX).start()
    try:
        engine, first = server.engine, server.pid
        handles = engine.submit_all([ask(engine, LONG, max_tokens=400), ask(engine, LONG, max_tokens=400)])
        assert handles[0].deltas.get(timeout=30)  # decoding
        os.kill(first, signal.SIGKILL)
        started = time.monotonic()
        for handle in handles:
            with pytest.raises(EngineUnavailable, match="unreachable or dropped the answer|ended the answer"):
                result_of(handle)
        assert time.monotonic() - started < 5
        wait_for(lambda: server.restarts == 1, 60, "the restart")
        assert server.pid != first and not process_exists(first)
        answer = result_of(engine.submit(ask(engine)))
        assert answer.finish_reason in ("stop", "length") and answer.text
    finally:
        server.stop()
    assert not process_exists(server.pid)


def test_it_answers_engine_unavailable_at_once_while_no_server_listens(base_gguf):
    server = LlamaServer(base_gguf, parallel=1, ctx_per_slot=CTX).start()
    engine = server.engine
    request = ask(engine)
    server.stop()
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="was stopped"):
        result_of(engine.submit(request))
    nobody = OpenAIEngine(Endpoint(f"http://127.0.0.1:{free_port()}"), info=engine.info, prompts=engine.prompts, adapters=engine.adapters)
    with pytest.raises(EngineUnavailable, match="unreachable"):
        result_of(nobody.submit(request))
    assert time.monotonic() - started < 6


def test_it_leaves_no_server_or_log_behind_when_stopped_or_when_its_process_is_killed(base_gguf):
    # A process that started a server and is then killed outright (no atexit): the server goes with it, and its
    # log, which it could not remove, is removed by the next start (in any process).
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from tuna_llm.settings import LlmSettings, configure
        configure(lambda: LlmSettings(base_models={{}}, default_base_model="", model_cache_dir=Path("."),
                                       llama_server_bin={str(llama_tools.binary(llama_tools.SERVER))!r}))
        from tuna_llm.serving.llama_server import LlamaServer
        server = LlamaServer(Path({str(base_gguf)!r}), parallel=1, ctx_per_slot={CTX}).start()
        print(server.pid, server.log_path, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, log = owner.stdout.readline().split()
        child, left_log = int(pid), Path(log)
        assert process_exists(child) and left_log.is_file() and left_log.name.startswith(f"tuna-llama-server-{owner.pid}-")
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not process_exists(child), 10, "the orphaned llama-server to die")
    assert left_log.is_file()  # nobody was left to remove it

    others = set(_server_pids())  # servers this process's pool started in earlier tests of the run
    server = LlamaServer(base_gguf, parallel=1, ctx_per_slot=CTX).start()
    assert not left_log.exists()  # removed by this start: its owner is gone
    assert set(_server_pids()) - others == {server.pid} and server.log_path.is_file()
    server.stop()
    assert not process_exists(server.pid) and not server.log_path.exists() and server.pid not in _server_pids()


def test_it_refuses_calls_without_its_key_which_no_command_line_shows_and_keeps_its_log_bounded(monkeypatch, base_gguf):
    monkeypatch.setattr(llama_server, "LOG_MAX_BYTES", 1024)
    monkeypatch.setattr(llama_server, "LOG_KEEP_BYTES", 256)
    monkeypatch.setattr(llama_server, "LOG_CHECK_S", 0.1)
    server = LlamaServer(base_gguf, parallel=1, ctx_per_slot=CTX).start()
    try:
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert server.api_key and server.api_key not in command and "--api-key" not in command  # ps shows no key
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=wrong, timeout=30).status_code == 401
        right = {"Authorization": f"Bearer {server.api_key}"}
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=right, timeout=30).status_code == 200

        # The log (about 0.7 KB once the model has loaded, as much again per call) is cut to its last
        # LOG_KEEP_BYTES once past LOG_MAX_BYTES; the server goes on writing at its end.
        assert result_of(server.engine.submit(ask(server.engine))).text
        wait_for(lambda: "llama_server: initializing" not in server.log_path.read_text(errors="replace"), 10, "the log's cut")
        assert server.log_path.stat().st_size <= 1024 and server.log_tail()
        assert result_of(server.engine.submit(ask(server.engine))).text
        wait_for(lambda: "print_timing" in server.log_path.read_text(errors="replace"), 10, "the next call in the log")
    finally:
        server.stop()


def test_it_gives_a_failed_start_to_the_calls_that_waited_for_it_instead_of_starting_again(settings, tmp_path, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a GGUF")
    starts = tmp_path / "starts"
    wrapper = tmp_path / "llama-server"  # the real llama-server, counting its starts
    wrapper.write_text(f'#!/bin/sh\necho started >> {starts}\nexec {llama_tools.binary(llama_tools.SERVER)} "$@"\n')
    wrapper.chmod(0o755)
    settings.TUNA_LLAMA_SERVER_BIN = str(wrapper)
    pool = LlamaServerPool(parallel=1, ctx_per_slot=CTX)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            pool.engine_for(broken, None)
        except BaseException as exc:  # noqa: BLE001 - collected for the asserts
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(errors) == 4 and all(isinstance(error, EngineUnavailable) for error in errors)
    assert all("exited while loading the model" in str(error) and str(tmp_path) not in str(error) for error in errors)
    assert starts.read_text().count("started") == 1
    with pytest.raises(EngineUnavailable):  # a call just after: the same answer, no new start
        pool.engine_for(broken, None)
    assert starts.read_text().count("started") == 1

    monkeypatch.setattr(llama_server, "START_FAILURE_S", 0.0)  # remembered a short while only: then tried again
    with pytest.raises(EngineUnavailable):
        pool.engine_for(broken, None)
    assert starts.read_text().count("started") == 2
    assert pool.servers() == []


def _server_pids() -> list[int]:
    """This process's llama-server children."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and "llama-server" in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_it_starts_a_server_with_a_new_lora_beside_the_old_and_stops_the_old_once_idle(settings, base_gguf, lora_ggufs):
    settings.TUNA_ADAPTER_CACHE_SIZE = 2
    pool = LlamaServerPool(parallel=1, ctx_per_slot=CTX)
    try:
        first, adapter = pool.engine_for(base_gguf, lora_ggufs[0])
        assert adapter.path == lora_ggufs[0].resolve()
        alone = result_of(first.submit(ask(first, lora=lora_ggufs[0]))).text
        [old] = pool.servers()
        assert old.loras == [lora_ggufs[0].resolve()]
        assert pool.engine_for(base_gguf, None)[0] is first  # the base model: any server of its GGUF

        busy = first.submit(ask(first, LONG, lora=lora_ggufs[0], max_tokens=200))  # in flight while the next starts
        second, _ = pool.engine_for(base_gguf, lora_ggufs[1])
        assert second is not first
        current = pool.servers()[0]
        assert current.loras == [lora_ggufs[0].resolve(), lora_ggufs[1].resolve()]
        assert result_of(busy).finish_reason in ("stop", "length")  # the old server finished its call
        assert result_of(second.submit(ask(second, lora=lora_ggufs[0]))).text == alone
        wait_for(lambda: not process_exists(old.pid), 30, "the replaced server to stop once idle")

        third, _ = pool.engine_for(base_gguf, lora_ggufs[2])  # at most 2 LoRAs: the least recently asked for goes
        assert pool.servers()[0].loras == [lora_ggufs[1].resolve(), lora_ggufs[2].resolve()]
        assert pool.engine_for(base_gguf, lora_ggufs[1])[0] is third
    finally:
        servers = pool.servers()
        pool.close()
    assert not any(process_exists(server.pid) for server in servers)


ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['content'] }}{% endfor %}"
)


def test_it_refuses_messages_a_gguf_s_chat_template_refuses_naming_its_rule(base_gguf):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tuna_llm.prompting import ChatTemplateRefused

    with launched(base_gguf, parallel=1, ctx_per_slot=CTX) as engine:
        engine.prompts.formatter = Jinja2ChatFormatter(template=ALTERNATING, eos_token="</s>", bos_token="<s>")  # a Mistral-style rule
        assert engine.prepare(CallSpec(messages=[{"role": "user", "content": "Hi"}])).prompt == "<s>Hi"
        with pytest.raises(ChatTemplateRefused) as refused:
            engine.prepare(CallSpec(messages=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]))
        assert refused.value.rule == "Conversation roles must alternate user/assistant/user/assistant/..."
