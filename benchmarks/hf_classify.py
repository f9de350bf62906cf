"""``hf_classify`` vs a plain ``transformers`` pipeline loop: the same model, the same texts.

Model: a random-weight BERT regression head (FineWeb-Edu-shaped: one output; ``--hidden``,
``--layers``) with a WordLevel tokenizer, built offline in a temp folder
(``curate/testing/tiny_hf.py``). Texts: ``--docs`` generated texts of 5 to ``--max-words`` words
(a wide length spread, as in web text). Truncation to ``--max-length`` tokens everywhere.

``plain bs=1``   ``pipeline("text-classification", function_to_apply="none")`` called on the
                 list of texts with ``batch_size=1`` (one forward per text: no padding)
``plain bs=N``   the same with ``batch_size=N`` (texts batched in input order, padded to the
                 longest of each batch)
``curate``       the ``hf_classify`` stage as a library call on an Arrow table: length-sorted
                 batches under a token budget (``--batch-tokens``), order restored

Scores of every path are compared with the ``bs=1`` scores (to 1e-4 of the largest score:
batched matmuls round differently). Best of ``--repeat`` runs. On a GPU add ``--device cuda``.

    python benchmarks/hf_classify.py [--docs 300] [--device cpu] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--max-words", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="the plain loop's batch size")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="curate's token budget per batch "
                    "(small batches suit a CPU; the stage's default, 16384, suits a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import pipeline

    from curate.stages.score.hf_classify import HfClassify
    from curate.testing.tiny_hf import make_texts, tiny_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = make_texts(args.docs, seed=11, max_words=args.max_words)
    tmp = tempfile.mkdtemp(prefix="curate-bench-hf-")
    folder = tiny_classifier(os.path.join(tmp, "edu"), "bert", num_labels=1, problem_type="regression",
                             labels=["score"], texts=texts, hidden=args.hidden, layers=args.layers,
                             heads=max(1, args.hidden // 64), intermediate=4 * args.hidden,
                             max_positions=args.max_length)
    device = 0 if args.device.startswith("cuda") else -1
    pipe = pipeline("text-classification", model=folder, tokenizer=folder, device=device,
                    function_to_apply="none")
    table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    stage = HfClassify(model=folder, device=args.device, dtype="float32", max_length=args.max_length,
                       batch_tokens=args.batch_tokens)
    stage.ensure_setup()
    n_tokens = sum(len(x) for x in stage._clf.encode(texts))

    def plain(bs: int) -> np.ndarray:
        res = pipe(texts, batch_size=bs, truncation=True, max_length=args.max_length)
        return np.array([r["score"] for r in res], np.float32)

    def curate() -> np.ndarray:
        return stage(table)["hf_score"].to_numpy()

    paths = [("plain bs=1", lambda: plain(1)), (f"plain bs={args.batch_size}", lambda: plain(args.batch_size)),
             ("curate hf_classify", curate)]
    plain(1)  # warm-up (first-call allocations)
    # the paths take turns, best of --repeat; wall time and this process's CPU time (on a shared
    # machine the CPU time of a 1-thread run is the steadier number)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.repeat):
        for name, fn in paths:
            t, c = time.perf_counter(), time.process_time()
            outs[name] = fn()
            wall[name] = min(wall.get(name, 1e9), time.perf_counter() - t)
            cpu[name] = min(cpu.get(name, 1e9), time.process_time() - c)
    print(f"{args.docs} docs, {n_tokens} tokens after truncation to {args.max_length}; BERT hidden {args.hidden} "
          f"x {args.layers} layers; device {args.device}; torch threads {torch.get_num_threads()}; "
          f"batch_tokens {args.batch_tokens}; best of {args.repeat}")
    ref = outs["plain bs=1"]
    scale = float(np.abs(ref).max()) or 1.0
    for name, _ in paths:
        diff = float(np.abs(outs[name] - ref).max()) / scale
        print(f"  {name:<20} {args.docs / wall[name]:8.1f} docs/s wall  {args.docs / cpu[name]:8.1f} docs/CPU-s  "
              f"{n_tokens / cpu[name]:9.0f} tokens/CPU-s  max |score - bs=1| / max |score| {diff:.1e}")
    c, b1, bn = cpu["curate hf_classify"], cpu["plain bs=1"], cpu[f"plain bs={args.batch_size}"]
    w, w1, wn = wall["curate hf_classify"], wall["plain bs=1"], wall[f"plain bs={args.batch_size}"]
    print(f"ratio curate / plain bs=1: {b1 / c:.2f}x CPU ({w1 / w:.2f}x wall);  curate / plain "
          f"bs={args.batch_size}: {bn / c:.2f}x CPU ({wn / w:.2f}x wall)")
    assert all(float(np.abs(o - ref).max()) / scale < 1e-4 for o in outs.values()), "scores differ"


if __name__ == "__main__":
    main()
