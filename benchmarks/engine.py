"""LLM engine overhead: the ``generate`` stage (library call) vs the same engine called directly.

Both generate the same N prompts with greedy decoding (same outputs, same token counts), without a
request cache. Prints generated tokens/s of each and the ratio (target: stage >= 0.9x direct).
The transformers engine (bundled SmolLM2-135M-Instruct, CPU) always runs; vLLM runs when a CUDA
GPU, the vllm package and ``--vllm-model`` are available, and is skipped with a message otherwise.

    python benchmarks/engine.py [--prompts 16] [--max-tokens 16] [--repeat 2] [--vllm-model PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import pyarrow as pa

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["bond yields", "inflation", "credit risk", "dividends", "audits", "contract law", "clinical trials",
          "gene therapy", "hedging", "swaps", "capital ratios", "deposits", "ledgers", "margins", "options",
          "protein folding"]


def make_table(n: int) -> pa.Table:
    texts = [f"Explain {TOPICS[i % len(TOPICS)]} in one sentence (variant {i})." for i in range(n)]
    return pa.table({"id": [f"d{i}" for i in range(n)], "text": texts, "source": ["bench"] * n,
                     "metadata": ["{}"] * n})


def bench(engine_cfg: dict, table: pa.Table, max_tokens: int, repeat: int) -> tuple[float, float]:
    from curate.engines import Request, SamplingParams
    from curate.stages.synth.generate import Generate

    template = "{text}"
    stage = Generate(engine=engine_cfg, template=template, max_tokens=max_tokens, cache=False)
    stage.ensure_setup()
    engine = stage.engine  # the very same engine object (no cache), called directly
    params = SamplingParams(max_tokens=max_tokens)
    reqs = [Request(messages=[{"role": "user", "content": template.format(text=t)}], params=params)
            for t in table.column("text").to_pylist()]
    # warm up both paths
    stage(table.slice(0, 2))
    engine.generate(reqs[:2])

    best_stage = best_direct = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        comps = engine.generate(reqs)
        dt = time.perf_counter() - t
        direct_tokens = sum(c.completion_tokens for c in comps)
        best_direct = max(best_direct, direct_tokens / dt)

        t = time.perf_counter()
        out = stage(table)
        dt = time.perf_counter() - t
        stage_tokens = sum(out.column("completion_tokens").to_pylist())
        best_stage = max(best_stage, stage_tokens / dt)
        assert stage_tokens == direct_tokens, (stage_tokens, direct_tokens)
    return best_stage, best_direct


def bench_runner(engine_cfg: dict, table: pa.Table, max_tokens: int) -> float:
    """Generated tokens/s of the generate stage through the local runner (one worker, in process):
    read_parquet -> generate -> Parquet shards, wall time of the whole (warm) run."""
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    from curate.run import run_pipeline

    tmp = tempfile.mkdtemp(prefix="curate-bench-engine-")
    try:
        def spec(name: str, t: pa.Table) -> dict:
            pq.write_table(t, os.path.join(tmp, f"{name}.parquet"))
            return {"name": "bench-engine", "output": os.path.join(tmp, f"out-{name}"), "workers": 1, "report": False,
                    "batch_size": 64,
                    "inputs": {"prompts": {"stage": "read_parquet",
                                           "options": {"paths": os.path.join(tmp, f"{name}.parquet")}}},
                    "stages": [{"stage": "generate", "options": {"engine": engine_cfg, "template": "{text}",
                                                                 "max_tokens": max_tokens, "cache": False,
                                                                 "batch_size": 64}}]}
        # warm up as the direct path was (the loaded model is shared within this process)
        run_pipeline(spec("warm", table.slice(0, 2)), progress=False)
        t = time.perf_counter()
        res = run_pipeline(spec("all", table), progress=False)
        dt = time.perf_counter() - t
        return res.stats["generate"]["counters"]["llm/completion_tokens"] / dt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(name: str, stage_tps: float, direct_tps: float) -> None:
    ratio = stage_tps / direct_tps if direct_tps else float("nan")
    print(f"{name:<14} stage {stage_tps:8.1f} tok/s   direct {direct_tps:8.1f} tok/s   "
          f"ratio {ratio:.2f}x (target >= 0.90x)")


def gpu_skip_reason(model: str | None) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'curate[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not model:
        return "no --vllm-model given"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers engine batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--vllm-model", default=os.environ.get("CURATE_VLLM_MODEL"))
    a = ap.parse_args()

    table = make_table(a.prompts)
    print(f"{a.prompts} prompts x {a.max_tokens} tokens (greedy), best of {a.repeat}")
    cfg = {"kind": "transformers", "batch_size": a.batch_size}
    if a.threads:
        cfg["num_threads"] = a.threads
    t = time.perf_counter()
    s, d = bench(cfg, table, a.max_tokens, a.repeat)
    report("transformers", s, d)
    r = bench_runner(cfg, table, a.max_tokens)
    print(f"{'  via runner':<14} run   {r:8.1f} tok/s   direct {d:8.1f} tok/s   ratio {r / d:.2f}x "
          "(a whole warm `curate` run: read, generate, write shards; target >= 0.90x)")
    print(f"  (transformers total incl. model load: {time.perf_counter() - t:.1f} s)")

    reason = gpu_skip_reason(a.vllm_model)
    if reason:
        print(f"vllm           skipped: {reason}")
    else:
        s, d = bench({"kind": "vllm", "model": a.vllm_model}, make_table(max(a.prompts, 256)),
                     a.max_tokens * 8, a.repeat)
        report("vllm", s, d)


if __name__ == "__main__":
    main()
