"""Tiny Hugging Face models built offline, with random weights (tests, benchmarks, gpu_check).

Nothing is downloaded: a WordLevel tokenizer is trained on the given texts with the ``tokenizers``
library and wrapped in ``PreTrainedTokenizerFast``; models come from a ``transformers`` config.
Imports only torch, transformers and tokenizers (no pyarrow, no curate pipeline), so
``benchmarks/gpu_check.py`` can use it on a machine that has nothing else.
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterable

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more "
    "data model energy cell market price river protein court engine network signal theorem proof "
    "student lesson history science water carbon atom planet orbit voltage current memory kernel "
    "function value graph tree matrix vector learning teacher school chapter experiment result"
).split()


def make_texts(n: int, seed: int = 0, min_words: int = 5, max_words: int = 300) -> list[str]:
    """``n`` reproducible texts of varied lengths (a length spread makes length sorting matter)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = int(min_words + (max_words - min_words) * rng.random() ** 2)
        words = [rng.choice(WORDS) for _ in range(k)]
        sentences = []
        while words:
            cut = rng.randint(4, 16)
            s = " ".join(words[:cut])
            words = words[cut:]
            sentences.append(s[0].upper() + s[1:] + ".")
        out.append(" ".join(sentences))
    return out


def build_tokenizer(folder: str, texts: Iterable[str] | None = None, vocab_size: int = 1000,
                    model_max_length: int = 512, bos_eos: bool = False) -> Any:
    """A WordLevel tokenizer trained on ``texts`` (default: :data:`WORDS`), saved to ``folder``.

    Encoder style (``bos_eos=False``): ``[CLS] ... [SEP]``, pad ``[PAD]``. Decoder style
    (``bos_eos=True``): ``<s>`` prefix, ``</s>`` as EOS and pad, and a small chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else [" ".join(WORDS)]
    special = ["<pad>", "<unk>", "<s>", "</s>"] if bos_eos else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(unk_token=special[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    else:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=model_max_length)
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_classifier(folder: str, arch: str = "bert", num_labels: int = 1, problem_type: str | None = None,
                    labels: list[str] | None = None, texts: Iterable[str] | None = None, seed: int = 0,
                    hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64,
                    max_positions: int = 512, vocab_size: int = 1000) -> str:
    """A random-weight ``AutoModelForSequenceClassification`` and its tokenizer in ``folder``.

    ``arch``: ``bert`` or ``deberta`` (DeBERTa-v2/v3). ``num_labels=1`` with
    ``problem_type="regression"`` is a FineWeb-Edu-style score head; ``multi_label_classification``
    a quality/domain classifier with independent labels."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, DebertaV2Config

    tok = build_tokenizer(folder, texts, vocab_size, model_max_length=max_positions)
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=intermediate,
                  max_position_embeddings=max_positions, num_labels=len(labels),
                  id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                  pad_token_id=tok.pad_token_id, initializer_range=0.2)
    if problem_type:
        common["problem_type"] = problem_type
    if arch == "bert":
        cfg = BertConfig(**common)
    elif arch == "deberta":
        cfg = DebertaV2Config(**common, relative_attention=True, position_buckets=256,
                              pos_att_type=["p2c", "c2p"], position_biased_input=False,
                              max_relative_positions=-1, type_vocab_size=0)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    # initializer_range 0.2 (not the usual 0.02): with small random weights every text gets almost
    # the same score; these spread over a few units, so ordering and rounding are exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(folder)
    return folder


def tiny_causal_lm(folder: str, texts: Iterable[str] | None = None, seed: int = 0, hidden: int = 64,
                   layers: int = 2, heads: int = 4, kv_heads: int | None = None, intermediate: int = 128,
                   vocab_size: int = 1000, max_positions: int = 2048, dtype: Any = None,
                   device: str = "cpu", never_stop: bool = False) -> str:
    """A random-weight Llama-architecture causal LM and a tokenizer in ``folder``. With
    ``vocab_size`` larger than the trained vocabulary the embedding is simply bigger (model shape
    as asked; the extra ids are never produced by the tokenizer but may be generated).

    ``never_stop``: the (tied) embedding rows of EOS and pad are zero, so their logit is exactly 0
    while the largest of the other random logits is positive: greedy decoding never stops early
    and every sequence gets ``max_new_tokens`` tokens (fixed work for speed comparisons)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder, texts, vocab_size, model_max_length=max_positions, bos_eos=True)
    cfg = LlamaConfig(vocab_size=max(vocab_size, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      intermediate_size=intermediate, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):          # a 1.7B model is built on the GPU in seconds
        model = LlamaForCausalLM(cfg)
    if never_stop:
        with torch.no_grad():
            for tid in {tok.eos_token_id, tok.pad_token_id}:
                model.get_input_embeddings().weight[tid].zero_()
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    return folder
