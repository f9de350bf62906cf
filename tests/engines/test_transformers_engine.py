"""The transformers engine on the real SmolLM2-135M-Instruct (short generations: CPU)."""

from __future__ import annotations

import os

import pytest

from curate.engines import Request, RequestCache, SamplingParams, make_engine
from curate.engines.transformers_engine import TransformersEngine

QUESTIONS = ["What is 2+2?", "Name a primary color.", "Say hello in French."]


def chat(q: str, **params) -> Request:
    return Request(messages=[{"role": "user", "content": q}], params=SamplingParams(**params))


@pytest.mark.slow
def test_batched_equals_one_by_one_greedy(smol):
    reqs = [chat(q, max_tokens=8) for q in QUESTIONS]
    batched = smol.generate(reqs)
    single = TransformersEngine({"batch_size": 1})  # shares the loaded weights
    assert single.model is smol.model
    one_by_one = [single.generate([r])[0] for r in reqs]
    assert [c.text for c in batched] == [c.text for c in one_by_one]
    assert all(c.ok and c.text for c in batched)
    # greedy decoding is deterministic
    assert [c.text for c in smol.generate(reqs)] == [c.text for c in batched]


def test_token_counts_and_length_finish(smol):
    req = chat("Write a long story about a dragon.", max_tokens=4)
    [c] = smol.generate([req])
    assert c.finish_reason == "length"
    assert c.completion_tokens == 4
    prompt = smol.render(req)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert c.prompt_tokens == len(smol.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert c.completion_tokens == len(smol.tokenizer(c.text, add_special_tokens=False)["input_ids"])


def test_eos_finish_counts_eos(smol):
    [c] = smol.generate([chat("What is 2+2? Answer with one number.", max_tokens=16)])
    assert c.finish_reason == "stop"
    n_text = len(smol.tokenizer(c.text, add_special_tokens=False)["input_ids"])
    assert c.completion_tokens == n_text + 1  # the EOS token is generated (and paid for)


def test_stop_strings(smol):
    raw = Request(prompt="The capital of France is", params=SamplingParams(max_tokens=8))
    stopped = Request(prompt="The capital of France is", params=SamplingParams(max_tokens=8, stop=["."]))
    [free, cut] = smol.generate([raw, stopped])
    assert "." in free.text
    assert cut.text == free.text.split(".")[0]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < 8


@pytest.mark.slow
def test_mixed_params_in_one_call_keep_order(smol):
    reqs = [chat(QUESTIONS[0], max_tokens=4), Request(prompt="1, 2, 3,", params=SamplingParams(max_tokens=6)),
            chat(QUESTIONS[1], max_tokens=4)]
    out = smol.generate(reqs)
    again = [smol.generate([r])[0] for r in reqs]
    assert [c.text for c in out] == [c.text for c in again]


def test_logprobs(smol):
    [c] = smol.generate([Request(prompt="The capital of France is",
                                 params=SamplingParams(max_tokens=3, logprobs=2))])
    assert len(c.logprobs) == c.completion_tokens == 3
    for t in c.logprobs:
        assert t.logprob <= 0 and len(t.top) == 2
        assert max(t.top.values()) == pytest.approx(t.logprob, abs=1e-5)  # greedy picks the top token
    assert "".join(t.token for t in c.logprobs) == c.text


@pytest.mark.slow
def test_seeded_sampling_reproducible(smol):
    req = Request(prompt="Once upon a time", params=SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=2))
    a = smol.generate([req])[0]
    b = smol.generate([req])[0]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len(a.choices) == 2
    other = smol.generate([Request(prompt="Once upon a time",
                                   params=SamplingParams(max_tokens=6, temperature=1.0, seed=8, n=2))])[0]
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]
    assert a.completion_tokens == sum(ch.completion_tokens for ch in a.choices)


def test_bad_request_fails_alone(smol):
    bad = Request(messages=[{"role": "user"}], params=SamplingParams(max_tokens=2))  # no content
    good = chat("Hi", max_tokens=2)
    out = smol.generate([bad, good])
    assert out[1].ok and out[1].text
    # the template may render a missing content as empty; either way nothing raised
    assert out[0].ok or out[0].finish_reason == "error"


def test_cache_second_run_generates_nothing(smol, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    reqs = [chat(q, max_tokens=6) for q in QUESTIONS]
    eng = TransformersEngine({}, cache=RequestCache(path))
    first = eng.generate(reqs)
    assert eng.stats["generated"] == 3 and not any(c.cached for c in first)
    # a resumed run: a new engine over the same cache file
    eng2 = make_engine({"kind": "transformers"}, cache=path)
    second = eng2.generate(reqs)
    assert eng2.stats["generated"] == 0 and eng2.stats["cached"] == 3
    assert all(c.cached for c in second)
    assert eng2._model is None  # all answers cached: the model was never loaded
    for a, b in zip(first, second):
        assert (a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens) == \
               (b.text, b.finish_reason, b.prompt_tokens, b.completion_tokens)
    # other sampling params are other cache entries
    eng2.generate([chat(QUESTIONS[0], max_tokens=5)])
    assert eng2.stats["generated"] == 1
    eng.close()
    eng2.close()


def test_converted_model_cache(smol):
    from curate.engines.transformers_engine import _converted_dir, resolve_model, _torch_dtype

    folder, gguf, mid = resolve_model(None, None)
    assert gguf.endswith(".gguf") and mid == gguf
    conv = _converted_dir(smol.config, folder, gguf, str(_torch_dtype(smol.config)))
    assert os.path.exists(os.path.join(conv, ".complete"))
    assert os.path.exists(os.path.join(conv, "tokenizer.json"))


def test_local_hf_folder_and_missing_model(smol, tmp_path):
    from curate.engines.transformers_engine import ModelNotFound, _LOADED

    with pytest.raises(ModelNotFound):
        make_engine({"kind": "transformers", "model": str(tmp_path / "nope")})
    # the converted folder is a plain HF model folder: load it as "any local model"
    from curate.engines.transformers_engine import _converted_dir, _torch_dtype, resolve_model

    folder, gguf, _ = resolve_model(None, None)
    conv = _converted_dir(smol.config, folder, gguf, str(_torch_dtype(smol.config)))
    eng = make_engine({"kind": "transformers", "model": conv})
    try:
        [c] = eng.generate([chat(QUESTIONS[0], max_tokens=4)])
        [ref] = smol.generate([chat(QUESTIONS[0], max_tokens=4)])
        assert c.text == ref.text
    finally:
        _LOADED.pop((conv, None, "cpu", str(_torch_dtype(smol.config))), None)
