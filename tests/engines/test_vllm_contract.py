"""The vLLM contract check (`make vllm-contract`) on small vllm source trees written by the test:
it passes on a tree with every name and fails, naming the name, when one is missing or moved.
A real wheel in $CURATE_VLLM_CONTRACT_DIR (what `make vllm-contract` downloads) is checked too."""

from __future__ import annotations

import glob
import os
import sys
import zipfile

import pytest

from curate.engines.vllm_contract import Source, check_source, contract, main

SPEC = contract()


def write_tree(root, version="0.33.0", drop: tuple[str, str] | None = None, add_request=("request_id", "prompt", "params")):
    """A vllm package with exactly the contract's names (``drop``: (class, name) left out)."""
    c = SPEC["classes"]

    def names(cls, key):
        return [n for n in c[cls].get(key, []) if drop != (cls, n)]

    def fields(cls):
        return "\n".join(f"    {n}: int = 0" for n in names(cls, "fields") + names(cls, "attributes")) or "    pass"

    llm_init = [n for n in c["LLM"]["init"] if n not in ("max_num_seqs", "max_num_batched_tokens",
                                                         "speculative_config", "enable_prefix_caching")]
    engine_args = ["max_num_seqs", "max_num_batched_tokens", "speculative_config", "enable_prefix_caching"]
    engine_args = [n for n in engine_args if drop != ("EngineArgs", n)]
    files = {
        "__init__.py": 'from vllm.entrypoints.llm import LLM\nfrom vllm.sampling_params import SamplingParams\n'
                       '__all__ = ["LLM", "SamplingParams"]\n',
        "_version.py": f"__version__ = version = {version!r}\n",
        "sampling_params.py": "import enum\nclass RequestOutputKind(enum.Enum):\n    CUMULATIVE = 0\n"
                              + ("    FINAL_ONLY = 2\n" if drop != ("RequestOutputKind", "FINAL_ONLY") else "")
                              + f"class SamplingParams:\n{fields('SamplingParams')}\n"
                              + (f"class StructuredOutputsParams:\n{fields('StructuredOutputsParams')}\n"
                                 if drop != ("module", "StructuredOutputsParams") else ""),
        "engine/arg_utils.py": "class EngineArgs:\n" + "\n".join(f"    {n}: int = 0" for n in engine_args) + "\n",
        "entrypoints/llm.py": (
            "class LLM:\n"
            f"    def __init__(self, {', '.join(n for n in llm_init if drop != ('LLM', n))}, **kwargs):\n"
            "        self.llm_engine = None\n"
            "    def generate(self, prompts, sampling_params=None, *, use_tqdm=True): ...\n"
            "    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None): ...\n"
            "    def get_tokenizer(self): ...\n"),
        "v1/engine/llm_engine.py": (
            "class LLMEngine:\n"
            f"    def add_request(self, {', '.join(add_request)}, arrival_time=None): ...\n"
            "    def step(self): ...\n    def abort_request(self, request_ids, internal=False): ...\n"),
        "outputs.py": "class CompletionOutput:\n" + fields("CompletionOutput") + "\n"
                      "class RequestOutput:\n    def __init__(self, request_id, prompt_token_ids, outputs, finished):\n"
                      + "".join(f"        self.{n} = {n}\n" for n in names("RequestOutput", "attributes")),
        "logprobs.py": "class Logprob:\n" + fields("Logprob") + "\n",
    }
    for rel, text in files.items():
        p = os.path.join(root, "vllm", rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
    return str(root)


def test_a_tree_with_every_name_passes(tmp_path):
    rep = check_source(Source(folder=write_tree(tmp_path)))
    assert rep.ok, rep.problems
    assert rep.version == "0.33.0" and rep.checked > 40


@pytest.mark.parametrize("drop,message", [
    (("SamplingParams", "logprobs"), "SamplingParams (sampling_params.py) has no field/attribute 'logprobs'"),
    (("SamplingParams", "output_kind"), "has no field/attribute 'output_kind'"),
    (("EngineArgs", "speculative_config"), "LLM.__init__ (entrypoints/llm.py) takes no argument 'speculative_config' (nor does EngineArgs)"),
    (("LLM", "gpu_memory_utilization"), "takes no argument 'gpu_memory_utilization'"),
    (("RequestOutput", "prompt_token_ids"), "RequestOutput (outputs.py) has no field/attribute 'prompt_token_ids'"),
    (("CompletionOutput", "finish_reason"), "has no field/attribute 'finish_reason'"),
    (("Logprob", "decoded_token"), "Logprob (logprobs.py) has no field/attribute 'decoded_token'"),
    (("RequestOutputKind", "FINAL_ONLY"), "RequestOutputKind (sampling_params.py) has no field/attribute 'FINAL_ONLY'"),
    (("SamplingParams", "structured_outputs"), "SamplingParams (sampling_params.py) has no field/attribute 'structured_outputs'"),
    (("StructuredOutputsParams", "json"), "StructuredOutputsParams (sampling_params.py) has no field/attribute 'json'"),
    (("module", "StructuredOutputsParams"), "`from vllm.sampling_params import StructuredOutputsParams`: sampling_params.py does not define"),
])
def test_a_missing_name_is_named(tmp_path, drop, message):
    rep = check_source(Source(folder=write_tree(tmp_path, drop=drop)))
    assert not rep.ok and any(message in p for p in rep.problems), rep.problems


def test_moved_arguments_and_versions_outside_the_range_fail(tmp_path):
    rep = check_source(Source(folder=write_tree(tmp_path / "a", add_request=("request_id", "params", "prompt"))))
    assert any("LLMEngine.add_request" in p and "positional parameters" in p for p in rep.problems)
    rep = check_source(Source(folder=write_tree(tmp_path / "b", version="0.9.2")))
    assert rep.problems == ["vLLM 0.9.2 is outside SUPPORTED_VLLM (>=0.11,<0.34)"]


def test_the_command_reads_wheels_and_exits_nonzero_on_problems(tmp_path, capsys):
    good = write_tree(tmp_path / "good")
    wheel = str(tmp_path / "vllm-0.33.0-cp38-abi3-any.whl")
    with zipfile.ZipFile(wheel, "w") as z:
        for p in glob.glob(os.path.join(good, "vllm", "**", "*.py"), recursive=True):
            z.write(p, os.path.relpath(p, good))
    assert main(["--wheel", wheel, "--json", str(tmp_path / "r.json")]) == 0
    assert "vLLM 0.33.0: ok" in capsys.readouterr().out
    bad = write_tree(tmp_path / "bad", drop=("Logprob", "rank"))
    assert main(["--src", bad]) == 1
    assert "FAILED (1 problem(s))" in capsys.readouterr().out
    assert main(["--src", str(tmp_path / "nothing")]) == 2


def _real_wheels() -> list[str]:
    d = os.environ.get("CURATE_VLLM_CONTRACT_DIR", "/tmp/curate-vllm-contract")
    return sorted(glob.glob(os.path.join(d, "vllm-*.whl")))


@pytest.mark.skipif(not _real_wheels(), reason="no vllm wheel downloaded (make vllm-contract downloads them)")
@pytest.mark.parametrize("wheel", _real_wheels())
def test_downloaded_vllm_releases_keep_the_contract(wheel):
    rep = check_source(Source(wheel=wheel))
    assert rep.ok, rep.problems


def test_the_gpu_extra_pins_the_supported_range():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    from curate.engines.vllm_contract import CHECKED_VERSIONS
    from curate.engines.vllm_engine import SUPPORTED_VLLM
    from packaging.specifiers import SpecifierSet

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        gpu = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
    assert [d for d in gpu if d.startswith("vllm")] == [f"vllm{SUPPORTED_VLLM}"]
    assert all(v in SpecifierSet(SUPPORTED_VLLM) for v in CHECKED_VERSIONS)
