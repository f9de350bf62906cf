"""The vllm engine around the vLLM call, with small fakes shaped like vLLM's objects (no GPU)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from curate.engines import Request, RequestCache, SamplingParams, VLLMConfig
from curate.engines.vllm_engine import VLLMEngine, completion_from_output, llm_kwargs, sampling_kwargs


# -- fakes mimicking vllm.outputs.RequestOutput / CompletionOutput / vllm.sequence.Logprob ----------
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class FakeSamplingParams:
    def __init__(self, **kw: Any):
        self.kw = kw


class FakeTokenizer:
    chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, chat_template=None):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=True):  # one id per character; BOS = 1
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


@dataclass
class FakeLLM:
    """Answers each prompt with its reverse; records the calls."""

    calls: list[tuple[str, list, list]] = field(default_factory=list)
    fail_on: str | None = None

    def get_tokenizer(self):
        return FakeTokenizer()

    def _out(self, i: int, prompt: Any, sp: FakeSamplingParams) -> RequestOutput:
        if isinstance(prompt, dict):  # TokensPrompt
            prompt = "".join(chr(t) for t in prompt["prompt_token_ids"])
        if self.fail_on and self.fail_on in prompt:
            raise ValueError("prompt too long")
        n = sp.kw["n"]
        text = prompt[::-1][: sp.kw["max_tokens"]]
        outs = [CompletionOutput(k, text, list(range(len(text))), None, None, "length") for k in range(n)]
        return RequestOutput(str(i), prompt, list(range(len(prompt))), outs)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", list(prompts), list(sampling_params)))
        return [self._out(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def chat(self, messages, sampling_params=None, use_tqdm=True, **kw):
        self.calls.append(("chat", list(messages), list(sampling_params)))
        return [self._out(i, m[-1]["content"], sp) for i, (m, sp) in enumerate(zip(messages, sampling_params))]


def fake_engine(monkeypatch, llm: FakeLLM, **cfg) -> VLLMEngine:
    # the batch path (one LLM.generate/chat call per batch); the continuous feeder is tested in
    # test_vllm_stream.py on a fake of the whole vllm module
    eng = VLLMEngine({"model": "/models/x", "continuous": False, **cfg}, llm=llm)
    eng._sampling_cls = FakeSamplingParams
    return eng


# -- tests ------------------------------------------------------------------------------------------
def test_sampling_kwargs():
    assert sampling_kwargs(SamplingParams()) == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 256}
    kw = sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5, stop=["\n", "END"],
                                        seed=3, n=4, logprobs=2))
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "stop": ["\n", "END"],
                  "seed": 3, "logprobs": 2}
    # greedy: one sequence (copied to n), no seed
    assert sampling_kwargs(SamplingParams(n=3, seed=1))["n"] == 1
    assert "seed" not in sampling_kwargs(SamplingParams(seed=1))


def test_llm_kwargs():
    kw = llm_kwargs(VLLMConfig(model="/m/q.gguf", tokenizer="/m/tok", tensor_parallel_size=2,
                               max_model_len=4096, gpu_memory_utilization=0.8,
                               engine_kwargs={"max_num_seqs": 64}))
    assert kw["model"] == "/m/q.gguf" and kw["tokenizer"] == "/m/tok"
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096
    assert kw["gpu_memory_utilization"] == 0.8 and kw["max_num_seqs"] == 64
    assert "quantization" not in llm_kwargs(VLLMConfig(model="/m"))


def test_completion_from_output():
    lp = [{5: Logprob(-0.1, 1, "He"), 9: Logprob(-2.5, 2, "She")},
          {7: Logprob(-0.7, 2, "llo"), 8: Logprob(-0.5, 1, "y")}]
    ro = RequestOutput("0", "p", [1, 2, 3, 4], [
        CompletionOutput(1, "Other", [1], -3.0, None, "length"),
        CompletionOutput(0, "Hello", [5, 7], -0.8, lp, "stop"),
    ])
    c = completion_from_output(ro, SamplingParams(n=2, temperature=1.0, logprobs=1))
    assert c.ok and c.prompt_tokens == 4
    assert [ch.text for ch in c.choices] == ["Hello", "Other"]
    assert c.finish_reason == "stop" and c.choices[1].finish_reason == "length"
    assert c.completion_tokens == 3
    first = c.choices[0].logprobs
    assert [(t.token, t.logprob) for t in first] == [("He", -0.1), ("llo", -0.7)]
    assert first[1].top == {"y": -0.5}  # the top-1 alternative, not the sampled token
    # no logprobs asked: none returned; greedy n=2 copies the single sequence
    c2 = completion_from_output(RequestOutput("1", "p", [1], [CompletionOutput(0, "x", [3], None, None, None)]),
                                SamplingParams(n=2))
    assert [ch.text for ch in c2.choices] == ["x", "x"] and c2.logprobs is None
    assert c2.finish_reason == "stop"
    assert not completion_from_output(RequestOutput("2", "p", [1], []), SamplingParams()).ok


def test_engine_tokenizer_chat_mode(monkeypatch):
    llm = FakeLLM()
    eng = fake_engine(monkeypatch, llm)
    out = eng.generate([Request(messages=[{"role": "user", "content": "abc"}], params=SamplingParams(max_tokens=50)),
                        Request(prompt="xyz", params=SamplingParams(max_tokens=2))])
    assert len(llm.calls) == 1 and llm.calls[0][0] == "generate"
    assert llm.calls[0][1] == ["<user>abc<assistant>", "xyz"]
    assert llm.calls[0][2][1].kw["max_tokens"] == 2
    assert out[0].text == "<user>abc<assistant>"[::-1] and out[1].text == "zy"
    assert out[0].prompt_tokens == len("<user>abc<assistant>")


def test_prompt_with_its_own_bos_gets_no_second_one(monkeypatch):
    llm = FakeLLM()
    eng = fake_engine(monkeypatch, llm)
    text = "<s> <CON> a text </CON>\n\n"
    out = eng.generate([Request(prompt=text, add_special_tokens=False, params=SamplingParams(max_tokens=50)),
                        Request(prompt="plain", params=SamplingParams(max_tokens=50))])
    sent = llm.calls[0][1]
    assert sent[0] == {"prompt_token_ids": [ord(c) for c in text]} and sent[1] == "plain"
    assert out[0].text == text[::-1]
    assert eng.count_tokens("abc") == 3


def test_engine_vllm_chat_mode_and_cache(monkeypatch, tmp_path):
    llm = FakeLLM()
    eng = fake_engine(monkeypatch, llm, chat_mode="vllm")
    eng.cache = RequestCache(str(tmp_path / "c.sqlite"))
    reqs = [Request(messages=[{"role": "user", "content": "abc"}]), Request(prompt="xyz")]
    out = eng.generate(reqs)
    assert sorted(c[0] for c in llm.calls) == ["chat", "generate"]
    assert out[0].text == "cba" and out[1].text == "zyx"
    again = eng.generate(reqs)
    assert len(llm.calls) == 2 and all(c.cached for c in again)


def test_engine_isolates_a_failing_prompt(monkeypatch):
    llm = FakeLLM(fail_on="BAD")
    eng = fake_engine(monkeypatch, llm)
    out = eng.generate([Request(prompt="ok1"), Request(prompt="BAD"), Request(prompt="ok2")])
    assert [c.ok for c in out] == [True, False, True]
    assert "prompt too long" in out[1].error


def test_missing_vllm_is_a_clear_error():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match="curate\\[gpu\\]"):
        VLLMEngine({"model": "/models/x"})


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'curate[gpu]')"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU"
    except ImportError:
        return "torch is not installed"
    if not os.environ.get("CURATE_VLLM_MODEL"):
        return "set CURATE_VLLM_MODEL to a local model folder to run the vLLM GPU test"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_vllm_on_gpu(tmp_path):  # pragma: no cover - needs a GPU
    from curate.engines import make_engine

    eng = make_engine({"kind": "vllm", "model": os.environ["CURATE_VLLM_MODEL"], "max_model_len": 2048,
                       "gpu_memory_utilization": 0.5}, cache=str(tmp_path / "c.sqlite"))
    reqs = [Request(messages=[{"role": "user", "content": f"Count to {i}."}], params=SamplingParams(max_tokens=16))
            for i in range(1, 5)]
    a = eng.generate(reqs)
    assert all(c.ok and c.text and c.completion_tokens <= 16 for c in a)
    b = eng.generate(reqs)
    assert all(c.cached for c in b) and [x.text for x in a] == [x.text for x in b]
    # the streaming path (background feeder on LLMEngine) gives the same greedy answers
    more = [Request(messages=[{"role": "user", "content": f"Name {i} colours."}], params=SamplingParams(max_tokens=16))
            for i in range(1, 9)]
    eng.cache = None
    streamed = eng.submit(more).results()
    assert all(c.ok for c in streamed)
    assert [c.text for c in streamed] == [c.text for c in eng.generate(more)]
