"""The model side of ``hf_classify``: a local Hugging Face sequence-classification (or regression)
model, run over many texts in length-sorted, token-budgeted batches.

Imports only torch and transformers (no pyarrow, no pipeline code), so ``benchmarks/gpu_check.py``
can measure exactly this code on a machine that has nothing else.

Batching: every text is tokenized (truncated to ``max_length``), texts are sorted by token length
(longest first: a batch that does not fit in memory fails at once, not at the end), and cut into
batches whose padded size ``rows x longest`` stays within ``batch_tokens`` (and at most
``max_batch_size`` rows). Each batch is padded only to its own longest text; results are put back
in the original order. With an attention mask the padding does not change a text's scores, so the
scores are those of one text at a time (to float rounding).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Sequence

# characters kept per token of max_length before tokenizing (bounds the cost of huge documents;
# a word-piece/BPE token is far shorter than this, so the first max_length tokens are unchanged)
CHARS_PER_TOKEN_CAP = 32

_LOADED: dict[tuple, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def read_model_config(folder: str) -> dict[str, Any]:
    """config.json of a local model folder (FileNotFoundError / ValueError with a clear message)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder} (hf_classify loads local folders only)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    return cfg


def head_kind(cfg: dict[str, Any]) -> str:
    """``regression``, ``multi_label`` or ``single_label`` from a model's config.json."""
    problem = cfg.get("problem_type")
    labels = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels") or len(labels) or 2)
    if problem == "regression" or (problem is None and n == 1):
        return "regression"
    if problem == "multi_label_classification":
        return "multi_label"
    return "single_label"


def label_names(cfg: dict[str, Any]) -> list[str]:
    labels = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels") or len(labels) or 2)
    return [str(labels.get(str(i), labels.get(i, f"LABEL_{i}"))) for i in range(n)]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def load(folder: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """(tokenizer, model) loaded once per process and (folder, device, dtype); never downloads."""
    key = (os.path.realpath(folder), device, str(dtype))
    with _LOCK:
        if key not in _LOADED:
            import transformers
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            dkw = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True, **dkw)
            _LOADED[key] = (tok, model.to(device).eval())
        return _LOADED[key]


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches: sorted by length, longest first (ties by index), each
    batch's ``rows x longest`` <= ``batch_tokens`` (a single longer text is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (w * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch_size):
            out.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


class SequenceClassifier:
    """Scores texts with a local sequence-classification model (see the module docstring)."""

    def __init__(self, folder: str, device: str = "auto", dtype: str = "auto", max_length: int = 512,
                 batch_tokens: int = 16384, max_batch_size: int = 256, activation: str = "auto"):
        self.folder = folder
        self.cfg = read_model_config(folder)
        self.kind = head_kind(self.cfg)
        self.labels = label_names(self.cfg)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_length = max_length
        self.batch_tokens = max(batch_tokens, max_length)
        self.max_batch_size = max_batch_size
        if activation == "auto":
            activation = {"regression": "none", "multi_label": "sigmoid"}.get(self.kind, "softmax")
        self.activation = activation
        self.tokenizer: Any = None
        self.model: Any = None
        self.stats = {"tokens": 0, "truncated": 0, "batches": 0, "padded_tokens": 0}

    def load(self) -> "SequenceClassifier":
        if self.model is None:
            self.tokenizer, self.model = load(self.folder, self.device, self.dtype)
            pad = self.tokenizer.pad_token_id
            self.pad_id = pad if pad is not None else 0
        return self

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        cap = self.max_length * CHARS_PER_TOKEN_CAP
        enc = self.tokenizer([t[:cap] for t in texts], truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return enc

    def scores(self, texts: Sequence[str]) -> Any:
        """A float32 numpy array (len(texts), n_outputs) of scores after the activation."""
        import numpy as np
        import torch

        self.load()
        n_out = len(self.labels)
        if not texts:
            return np.zeros((0, n_out), np.float32)
        ids = self.encode(texts)
        lengths = [len(x) for x in ids]
        self.stats["tokens"] += sum(lengths)
        self.stats["truncated"] += sum(1 for n in lengths if n >= self.max_length)
        out = np.empty((len(texts), n_out), np.float32)
        dev = self.model.device
        with torch.inference_mode():
            for batch in length_batches(lengths, self.batch_tokens, self.max_batch_size):
                width = lengths[batch[0]]
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in enumerate(batch):
                    input_ids[j, :lengths[i]] = torch.tensor(ids[i], dtype=torch.long)
                    mask[j, :lengths[i]] = 1
                logits = self.model(input_ids=input_ids.to(dev, non_blocking=True),
                                    attention_mask=mask.to(dev, non_blocking=True)).logits.float()
                if self.activation == "softmax":
                    logits = torch.softmax(logits, dim=-1)
                elif self.activation == "sigmoid":
                    logits = torch.sigmoid(logits)
                out[batch] = logits.cpu().numpy()
                self.stats["batches"] += 1
                self.stats["padded_tokens"] += len(batch) * width
        return out
