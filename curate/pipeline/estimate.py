"""``curate estimate``: what a pipeline's LLM steps will cost before anything is spent.

How an estimate is made (README, "Estimating cost before a run"):

1. *Upstream, measured.* The steps that call no LLM and have no LLM step above them run normally
   (the runner, resumable) into a scratch output, ``<output>.estimate/upstream`` by default, never
   the pipeline's own output. Each input of an LLM step is kept (``save``), so the number of rows
   an LLM step will get from them is counted, not guessed.
2. *LLM steps, sampled.* Each LLM step runs in this process on a seeded sample of ``sample`` rows
   of its real input (rows picked by position with ``random.Random(seed)``), with no request
   cache, no budget (the run's budgets are neither charged nor able to stop the sample) and no
   failure-rate stop (the sample's parse-failure rate is measured instead). What it used
   (requests, retries included; prompt and completion tokens; unparsed answers; output rows) is
   multiplied by ``input rows / sample rows``. Steps below an LLM step (an LLM filter before a
   synthesis step) run on the sample's output, and their input size is *projected* from the
   sample's yield; the JSON says which numbers are measured and which projected.
3. *Counted, not called.* With ``no_call`` (``--no-call``), or when the engine cannot be reached,
   a step's requests are built but not sent: prompt tokens are counted with the engine's tokenizer
   (transformers: the model's, chat template applied; vllm: the model folder's tokenizer; openai:
   tiktoken when installed with its encoding on disk, else UTF-8 bytes / 4, said as such) and
   completion tokens are ``max_tokens`` per request (an upper bound). Follow-up requests that
   depend on answers (entigraph relations, instruction_synth rounds) cannot be counted so, and
   steps below such a step are not estimated.

Cost is tokens x the engine's ``price_prompt`` / ``price_completion`` (per million tokens). Time is
completion tokens / throughput: the engine's ``throughput_tokens_per_s`` when configured (one
engine instance: a vLLM/transformers engine on its GPU(s), or the whole OpenAI-compatible
endpoint), else measured on the sample (completion tokens / generation wall time, engine start-up
timed apart and added once), times the engine instances the run has at once (local runner: its
workers, at most one per free GPU group for GPU engines; Ray: ``resources.replicas``; openai: 1).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.pipeline.config import Pipeline, Step

log = logging.getLogger("curate")

ESTIMATE_FILE = "estimate.json"
NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "cost", "seconds")


class EstimateError(Exception):
    """The estimate could not be made (the scratch run failed, a step raised)."""


def default_scratch(output: str) -> str:
    """Where ``curate estimate`` works and writes ``estimate.json``: next to the output, never in it."""
    return output.rstrip("/") + ".estimate"


def scratch_problem(scratch: str, output: str) -> str | None:
    """Why ``scratch`` cannot hold an estimate for a run writing ``output`` (None: it can)."""
    def norm(p: str) -> str:
        return p.rstrip("/") if "://" in p else os.path.abspath(p)

    s, o = norm(scratch), norm(output)
    if s == o or s.startswith(o + "/") or o.startswith(s + "/"):
        return (f"the scratch folder {scratch} overlaps the pipeline's output {output}: the estimate never "
                "writes into the output (choose another --scratch)")
    return None


def is_llm(step: Step) -> bool:
    from curate.llm.stage import LLMStage

    return isinstance(step.stage, LLMStage)


def llm_numbers(counters: dict[str, float]) -> dict[str, Any]:
    """What an LLM step used, from its counters (a sample's or a run's ``stats.json``): requests
    sent (retries included; cached answers and identical requests answered once not counted),
    prompt/completion tokens, cost (None without prices), and the parse-failure rate: answers that
    did not parse (each try, retries included) per answer received."""
    c = counters
    requests = int(c.get("llm/requests", 0) - c.get("llm/cached", 0))
    answered = c.get("llm/requests", 0) - c.get("llm/failed", 0) + c.get("llm/parse_failed", 0)
    unparsed = c.get("llm/parse_retries", 0) + c.get("llm/parse_failed", 0)
    return {"requests": requests, "prompt_tokens": int(c.get("llm/prompt_tokens", 0)),
            "completion_tokens": int(c.get("llm/completion_tokens", 0)),
            "cost": c["llm/cost"] if "llm/cost" in c else None,
            "parse_failures": int(unparsed),
            "parse_failure_rate": (unparsed / answered) if answered > 0 else None}


# ------------------------------------------------------------------------------------------------
# token counting without calling the engine


def _tiktoken_encoding(model: str) -> Any | None:
    """A tiktoken encoding for ``model`` when tiktoken is installed and the encoding file is
    already on disk (tiktoken would otherwise download it: nothing is downloaded at run time)."""
    try:
        import hashlib
        import tempfile

        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except Exception:  # noqa: BLE001 - an unknown model: the current OpenAI encoding
        name = "o200k_base"
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
             or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    if not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())):
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001
        return None


class TokenCounter:
    """What an LLM stage needs from its engine to build requests (``count_tokens``,
    ``prompt_tokens``, ``hf_tokenizer``, ``kind``, ``model_id``), without generating anything.
    ``method`` says how tokens are counted."""

    def __init__(self, config: Any):
        from curate.engines import Engine

        self.config = config
        self.kind = config.kind
        self.model_id = getattr(config, "model", None) or ""
        self._engine: Any = None
        self._tok: Any = None
        self._enc: Any = None
        self._count = Engine.count_tokens.__get__(self)          # UTF-8 bytes / 4
        self._prompt = Engine.prompt_tokens.__get__(self)
        if config.kind == "transformers":
            from curate.llm import pool

            self._engine = pool.acquire(config)
            self.model_id = self._engine.model_id
            self.method = f"the model's tokenizer ({self.model_id}, chat template applied)"
        elif config.kind == "vllm":
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(config.tokenizer or config.model, local_files_only=True)
                self.method = f"the tokenizer of {config.tokenizer or config.model} (chat template applied)"
            except Exception as exc:  # noqa: BLE001
                self.method = (f"UTF-8 bytes / 4 (a heuristic: the tokenizer of {config.model!r} could not "
                               f"be loaded: {type(exc).__name__})")
        else:
            self._enc = _tiktoken_encoding(self.model_id)
            self.method = (f"tiktoken {self._enc.name}" if self._enc is not None else
                           "UTF-8 bytes / 4 (a heuristic: an HTTP endpoint has no tokenizer here, and "
                           "tiktoken with its encoding on disk is not installed)")

    def count_tokens(self, text: str) -> int:
        if self._engine is not None:
            return self._engine.count_tokens(text)
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False))
        if self._enc is not None:
            return len(self._enc.encode(text, disallowed_special=()))
        return self._count(text)

    def prompt_tokens(self, request: Any) -> int:
        if self._engine is not None:
            return self._engine.prompt_tokens(request)
        if self._tok is not None:
            from curate.engines.base import apply_chat_template

            text = (apply_chat_template(self._tok, request.messages, getattr(self.config, "chat_template", None))
                    if request.messages is not None else request.prompt or "")
            return self.count_tokens(text)
        return self._prompt(request)

    def hf_tokenizer(self) -> Any:
        if self._engine is not None:
            return self._engine.hf_tokenizer()
        return self._tok

    def release(self) -> None:
        if self._engine is not None:
            from curate.llm import pool

            pool.release(self._engine)
            self._engine = None


# ------------------------------------------------------------------------------------------------
# the estimate


@dataclass
class _Rows:
    """A step's rows in the estimate: ``table`` (a sample, or the sample's output) where each row
    stands for ``scale`` rows of the real run; ``rows`` the real (or projected) row count."""

    table: pa.Table | None
    scale: float
    rows: float
    measured: bool                    # rows counted on the real input (not projected)
    why_not: str | None = None        # not estimated: why


@dataclass
class Estimator:
    pipe: Pipeline
    sample: int = 20
    seed: int = 0
    no_call: bool = False
    scratch: str | None = None
    workers: int | None = None
    progress: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scratch = self.scratch or default_scratch(self.pipe.output)
        problem = scratch_problem(self.scratch, self.pipe.output)
        if problem:
            raise EstimateError(problem)

    # -- phase 1: the steps above every LLM step, run for real into the scratch output ------------
    def split(self) -> tuple[list[str], list[str]]:
        """(steps run for real, steps estimated on the sample), in file order."""
        below: set[str] = set()
        for s in self.pipe.steps.values():
            if is_llm(s) or any(i in below for i in s.inputs + s.refs):
                below.add(s.name)
        return [n for n in self.pipe.steps if n not in below], [n for n in self.pipe.steps if n in below]

    def upstream_pipeline(self, names: list[str], sampled: list[str]) -> Pipeline:
        pipe = self.pipe
        keep = set(names)
        feeds = {i for n in sampled for i in pipe.steps[n].inputs if i in keep}
        steps: dict[str, Step] = {}
        for n in names:
            st = copy.copy(pipe.steps[n])
            st.save = st.save or n in feeds
            steps[n] = st
        out = self.upstream_output()
        stages = [s.model_copy(update={"save": s.save or (s.name or s.stage) in feeds})
                  for s in pipe.spec.stages if (s.name or s.stage) in keep]
        spec = pipe.spec.model_copy(update={
            "output": out, "report": False, "stages": stages,
            "inputs": {k: v for k, v in pipe.spec.inputs.items() if k in keep}})
        raw = None
        if isinstance(pipe.unexpanded, dict):   # keep ``${VAR}`` values unexpanded in pipeline.json
            raw = dict(pipe.unexpanded)
            raw["output"] = out
            raw["report"] = False
            raw["stages"] = [{**s, "save": bool(s.get("save")) or (s.get("name") or s.get("stage")) in feeds}
                             for s in raw.get("stages") or [] if (s.get("name") or s.get("stage")) in keep]
            raw["inputs"] = {k: v for k, v in (raw.get("inputs") or {}).items() if k in keep}
        return Pipeline(spec, steps, pipe.path, raw)

    def upstream_output(self) -> str:
        return self.scratch.rstrip("/") + "/upstream"

    # -- the whole estimate ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import shutil
        import tempfile

        # the sample's own work (steps below an LLM step) on this machine's disk, removed at the end
        self._local = tempfile.mkdtemp(prefix="curate-estimate-")
        try:
            return self._run()
        finally:
            shutil.rmtree(self._local, ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        from curate.pipeline.runner import PipelineError, Runner

        t0 = time.monotonic()
        real, sampled = self.split()
        llm_steps = [n for n in sampled if is_llm(self.pipe.steps[n])]
        rows: dict[str, _Rows] = {}
        upstream_stats: dict[str, dict] = {}
        if llm_steps and real:
            up = self.upstream_pipeline(real, sampled)
            log.info("estimate: running the %d step(s) above the LLM steps into %s", len(real), up.output)
            try:
                res = Runner(up, workers=self.workers, progress=self.progress).run()
            except PipelineError as exc:
                raise EstimateError(f"the steps above the LLM steps failed in the scratch output "
                                    f"{up.output}: {exc}") from exc
            upstream_stats = res.stats
            self._outputs = res.outputs
            for n in real:
                if n in res.outputs:
                    rows[n] = _Rows(None, 1.0, self._count_rows(res.outputs[n]), True)
        steps_out: dict[str, dict] = {}
        for n in sampled:
            step = self.pipe.steps[n]
            rin = self._input_rows(step, rows)
            if is_llm(step):
                try:
                    est, rout = self._llm_step(step, rin)
                except Exception as exc:  # noqa: BLE001 - named, with the step
                    raise EstimateError(f"step {n!r} failed on the sample of {self.sample} rows: "
                                        f"{type(exc).__name__}: {exc}") from exc
                steps_out[n] = est
            else:
                rout = self._other_step(step, rin)
            rows[n] = rout
        total = self._total(steps_out)
        return {"pipeline": self.pipe.spec.name, "file": self.pipe.path, "output": self.pipe.output,
                "scratch": self.scratch, "sample": self.sample, "seed": self.seed,
                "mode": "counted (--no-call)" if self.no_call else "sampled",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 3),
                "upstream": {n: {"in": s["in"], "out": s["out"]} for n, s in upstream_stats.items()},
                "steps": steps_out, "total": total, "notes": self.notes}

    # -- inputs ------------------------------------------------------------------------------------
    def _input_rows(self, step: Step, rows: dict[str, _Rows]) -> list[tuple[str, _Rows]]:
        out = []
        for inp in step.inputs:
            r = rows.get(inp)
            if r is None:
                r = _Rows(None, 1.0, 0, False, why_not=f"input {inp!r} was not estimated")
            elif r.table is None and r.why_not is None:   # a real step: take the seeded sample now
                r = self._sample_of(inp, r)
                rows[inp] = r
            out.append((inp, r))
        return out

    @staticmethod
    def _count_rows(urls: list[str]) -> int:
        import pyarrow.parquet as pq

        from curate.pipeline.io import get_fs

        n = 0
        for url in urls:
            fs, p = get_fs(url)
            with fs.open(p, "rb") as f:
                n += pq.ParquetFile(f).metadata.num_rows
        return n

    def _sample_of(self, name: str, r: _Rows) -> _Rows:
        from curate.pipeline.io import read_table

        urls = self._outputs.get(name, [])
        total = int(r.rows)
        k = min(self.sample, total)
        picked = sorted(random.Random(self.seed).sample(range(total), k)) if k else []
        parts, start, j = [], 0, 0
        for url in urls:
            if j >= len(picked):
                break
            t = read_table(url)
            end = start + t.num_rows
            idx = []
            while j < len(picked) and picked[j] < end:
                idx.append(picked[j] - start)
                j += 1
            if idx:
                parts.append(t.take(pa.array(idx, pa.int64())))
            start = end
        table = pa.concat_tables(parts, promote_options="permissive") if parts else None
        if table is None:
            return _Rows(None, 1.0, 0, True, why_not=f"input {name!r} has no rows")
        return _Rows(table, total / table.num_rows, total, True)

    # -- steps below an LLM step that call no LLM: run on the sample ------------------------------
    def _other_step(self, step: Step, inputs: list[tuple[str, _Rows]]) -> _Rows:
        bad = [r.why_not for _, r in inputs if r.why_not]
        if bad:
            return _Rows(None, 1.0, 0, False, why_not=bad[0])
        stage = step.stage
        workdir = os.path.join(self._local, step.name)
        os.makedirs(workdir, exist_ok=True)
        stage.workdir = workdir
        try:
            if stage.kind == "global":
                out = self._global(step, inputs, workdir)
            else:
                (_, r), = inputs
                out = self._map(stage, r.table)
        except Exception as exc:  # noqa: BLE001 - named in the estimate, the others go on
            why = f"step {step.name!r} failed on the sample: {type(exc).__name__}: {exc}"
            self.notes.append(why)
            return _Rows(None, 1.0, 0, False, why_not=why)
        if stage.kind == "global":
            self.notes.append(f"step {step.name!r} ({stage.name}, a global step) ran on the sample: the rows it "
                              "keeps are projected linearly (a fixed limit such as `top` does not scale so)")
        rows_in = sum(r.table.num_rows for _, r in inputs)
        real_in = sum(r.rows for _, r in inputs)
        scale = real_in / rows_in if rows_in else 1.0
        return _Rows(out, scale, out.num_rows * scale, False)

    def _map(self, stage: Any, table: pa.Table) -> pa.Table:
        size = self.pipe.spec.batch_size
        parts = [stage.process_safe(table.slice(i, size)) for i in range(0, table.num_rows, size)]
        stage.take_side()
        parts = [p for p in parts if p.num_rows] or parts[:1]
        return pa.concat_tables(parts, promote_options="permissive")

    def _global(self, step: Step, inputs: list[tuple[str, _Rows]], workdir: str) -> pa.Table:
        import pyarrow.parquet as pq

        from curate.pipeline.context import RunContext
        from curate.pipeline.io import Dataset, MemoryWriter

        files: dict[str, list[str]] = {}
        for name, r in inputs:
            d = os.path.join(self._local, "_inputs", step.name, name)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, "part-00000.parquet")
            pq.write_table(r.table, path)
            files[name] = [path]
        stage = step.stage
        stage.ensure_setup()
        writer = MemoryWriter()
        ctx = RunContext(workdir, workers=1, inputs=files)
        stage.run(Dataset([f for fs in files.values() for f in fs]), writer, ctx)
        stage.take_side()
        return writer.table()

    # -- LLM steps ---------------------------------------------------------------------------------
    def _sample_stage(self, step: Step) -> Any:
        """A copy of the step's stage for the sample: no cache, no budget, no failure-rate stop."""
        opts = step.stage.config.model_dump()
        opts.update(cache=False, cache_path=None, max_requests=None, max_total_tokens=None, max_cost=None,
                    max_failure_rate=1.0)
        st = type(step.stage)(opts)
        st.step_name = step.name
        st.workdir = None
        return st

    def _llm_step(self, step: Step, inputs: list[tuple[str, _Rows]]) -> tuple[dict, _Rows]:
        cfg = step.stage.config
        eng = cfg.engine
        (_, r), = inputs
        est: dict[str, Any] = {
            "stage": step.stage.name, "fingerprint": step.fingerprint,
            "engine": {"kind": eng.kind, "model": getattr(eng, "model", None)},
            "prices": {"prompt": eng.price_prompt, "completion": eng.price_completion},
            "input_rows": round(r.rows), "input_rows_from": "measured" if r.measured else "projected",
            "sample_rows": r.table.num_rows if r.table is not None else 0, "notes": []}
        if r.measured and r.rows == 0:   # nothing to send: nothing to pay
            est.update(method="no input rows", **{k: 0 for k in NUMBERS}, parse_failure_rate=None, output_rows=0)
            return est, _Rows(None, 1.0, 0, True, why_not=f"step {step.name!r} has no input rows")
        if r.why_not:
            est.update(method="not estimated", why=r.why_not, **{k: None for k in NUMBERS},
                       parse_failure_rate=None, output_rows=None)
            return est, _Rows(None, 1.0, 0, False, why_not=f"step {step.name!r} was not estimated")
        sample: dict[str, Any] | None = None
        if not self.no_call:
            sample = self._call(step, r.table, est)
        if sample is None:
            sample = self._count(step, r.table, est)
        s = r.scale
        est["sample"] = sample
        est["method"] = sample["method"]
        est["requests"] = round(sample["requests"] * s)
        est["prompt_tokens"] = round(sample["prompt_tokens"] * s)
        est["completion_tokens"] = round(sample["completion_tokens"] * s)
        est["completion_tokens_from"] = sample["completion_tokens_from"]
        priced = eng.price_prompt is not None or eng.price_completion is not None
        est["cost"] = ((est["prompt_tokens"] * (eng.price_prompt or 0.0)
                        + est["completion_tokens"] * (eng.price_completion or 0.0)) / 1e6) if priced else None
        if not priced:
            est["notes"].append("no price_prompt/price_completion in the engine config: no cost")
        est["parse_failure_rate"] = sample.get("parse_failure_rate")
        self._time(step, est, sample)
        out = sample.pop("_table", None)
        if out is None:
            est["output_rows"] = None
            return est, _Rows(None, 1.0, 0, False,
                              why_not=f"step {step.name!r} was counted, not called: its output is unknown")
        est["output_rows"] = round(out.num_rows * s)
        return est, _Rows(out, s, out.num_rows * s, False)

    def _time(self, step: Step, est: dict, sample: dict) -> None:
        eng = step.stage.config.engine
        configured = getattr(eng, "throughput_tokens_per_s", None)
        inst = self._instances(step)
        est["engine_instances"] = inst
        if configured:
            tput, src = float(configured), "configured (engine throughput_tokens_per_s)"
        elif sample.get("generate_seconds") and sample["completion_tokens"]:
            tput = sample["completion_tokens"] / sample["generate_seconds"]
            src = (f"measured on the sample ({sample['completion_tokens']:,} completion tokens in "
                   f"{sample['generate_seconds']:.1f}s, one engine, {sample['window']} requests in flight at most)")
        else:
            est.update(seconds=None, throughput_tokens_per_s=None, throughput_from=None)
            est["notes"].append("no time: set the engine's throughput_tokens_per_s (the engine was not called)")
            return
        start = sample.get("startup_seconds") or 0.0
        est["throughput_tokens_per_s"] = round(tput, 3)
        est["throughput_from"] = src
        est["seconds"] = round(start + est["completion_tokens"] / (tput * inst), 3)

    def _instances(self, step: Step) -> int:
        eng = step.stage.config.engine
        if eng.kind == "openai":
            return 1
        res = step.stage.resources
        if self.pipe.spec.runner == "ray":
            return int(res.replicas or 1)
        workers = self.workers or self.pipe.spec.workers or os.cpu_count() or 1
        if res.gpus > 0:
            from curate.pipeline.local_executor import gpu_count

            n = gpu_count()
            if n:
                workers = min(workers, max(1, int(n // res.gpus)))
        return max(1, min(workers, res.replicas or workers))

    def _call(self, step: Step, table: pa.Table, est: dict) -> dict | None:
        """Run the stage on the sample; None when the engine could not be reached (then counted)."""
        from curate.pipeline.stage import StageError

        st = self._sample_stage(step)
        try:
            st.ensure_setup()
            t0 = time.monotonic()
            st.engine.shared.load()
            startup = time.monotonic() - t0
            t1 = time.monotonic()
            try:
                out = self._map(st, table)
            except StageError as exc:
                c = st.counters.data
                if c.get("llm/prompt_tokens", 0) + c.get("llm/completion_tokens", 0) > 0:
                    raise   # the engine answered: a real problem of the step, not an unreachable engine
                est["notes"].append(f"the engine could not be reached ({exc}); prompts counted instead")
                return None
            gen = time.monotonic() - t1
            nums = llm_numbers(dict(st.counters.data))
            window = min(st.engine.window(st.config.batch_size), max(1, nums["requests"]))
            return {"method": "sampled (engine called)", "rows": table.num_rows, "output_rows": out.num_rows,
                    **nums, "completion_tokens_from": "measured",
                    "failed_requests": int(st.counters.data.get("llm/failed", 0)),
                    "errors": {k[7:]: int(v) for k, v in st.counters.data.items() if k.startswith("errors/")},
                    "startup_seconds": round(startup, 3), "generate_seconds": round(gen, 3),
                    "window": window, "_table": out}
        finally:
            st.teardown()

    def _count(self, step: Step, table: pa.Table, est: dict) -> dict:
        """Build the sample's requests without sending them: prompt tokens counted with the
        engine's tokenizer, completion tokens = ``max_tokens`` (an upper bound)."""
        st = self._sample_stage(step)
        counter = TokenCounter(st.config.engine)
        try:
            st.engine, st.cache, st.budget = counter, None, None
            st._is_setup = True
            rows = st.rows(table)
            n_req = prompt = completion = 0
            follow = invalid = 0
            empty: list[int] = []
            for unit in st.units(rows, empty):
                try:
                    jobs = st.jobs(unit)
                except st.invalid_prompt_errors:  # type: ignore[misc]
                    invalid += 1
                    continue
                for job in jobs:
                    follow += job.then is not None
                    for req in job.requests:
                        n_req += 1
                        prompt += counter.prompt_tokens(req)
                        completion += req.params.max_tokens * req.params.n
        finally:
            counter.release()
            st.engine = None
            st._is_setup = False
        if follow:
            est["notes"].append(f"{follow} job(s) of the sample have follow-up requests that depend on the "
                                "answers (not counted: a lower bound on requests)")
        if invalid:
            est["notes"].append(f"{invalid} sample row(s) could not become a request")
        return {"method": f"counted, not called: prompt tokens by {counter.method}; completion tokens = "
                          "max_tokens per request (an upper bound)",
                "rows": table.num_rows, "output_rows": None, "requests": n_req, "prompt_tokens": prompt,
                "completion_tokens": completion, "completion_tokens_from": "max_tokens (upper bound)",
                "cost": None, "parse_failures": None, "parse_failure_rate": None, "empty_rows": len(empty)}

    # -- totals ------------------------------------------------------------------------------------
    def _total(self, steps: dict[str, dict]) -> dict[str, Any]:
        tot: dict[str, Any] = {}
        for k in NUMBERS:
            vals = [s.get(k) for s in steps.values()]
            known = [v for v in vals if v is not None]
            tot[k] = (round(sum(known), 6) if k == "cost" else sum(known)) if known else None
            if known and len(known) < len(vals):
                tot[f"{k}_incomplete"] = True   # some steps have no value: the total is a lower bound
        return tot


# ------------------------------------------------------------------------------------------------
# output


def _num(v: Any, kind: str = "int") -> str:
    if v is None:
        return "-"
    if kind == "cost":
        return f"{v:,.4f}"
    if kind == "time":
        return _duration(v)
    if kind == "pct":
        return f"{100 * v:.0f}%"
    return f"{int(v):,}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def estimate_table(est: dict[str, Any]) -> str:
    """The terminal table: one row per LLM step and a total."""
    head = ("step", "stage", "input rows", "sample", "requests", "prompt tok", "completion tok", "cost",
            "time", "parse fail")
    rows = [head]
    for name, s in est["steps"].items():
        inp = "-" if s.get("input_rows") is None else f"{s['input_rows']:,}" + (
            "" if s.get("input_rows_from") == "measured" else " (proj.)")
        comp = _num(s.get("completion_tokens")) + (" (max)" if "upper" in str(s.get("completion_tokens_from")) else "")
        rows.append((name, s["stage"], inp, str(s.get("sample_rows", "-")), _num(s.get("requests")),
                     _num(s.get("prompt_tokens")), comp, _num(s.get("cost"), "cost"),
                     _num(s.get("seconds"), "time"), _num(s.get("parse_failure_rate"), "pct")))
    t = est["total"]
    rows.append(("total", "", "", "", _num(t.get("requests")), _num(t.get("prompt_tokens")),
                 _num(t.get("completion_tokens")), _num(t.get("cost"), "cost"), _num(t.get("seconds"), "time"), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for j, r in enumerate(rows):
        if j == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def estimate_notes(est: dict[str, Any]) -> list[str]:
    """How each step's numbers were obtained, for below the table."""
    out = []
    for name, s in est["steps"].items():
        if s.get("why"):
            out.append(f"{name}: not estimated: {s['why']}")
            continue
        line = f"{name}: {s.get('method')}"
        if s.get("input_rows_from") == "projected":
            line += "; input rows projected from the sample's yield upstream"
        if s.get("throughput_from"):
            line += (f"; time from {s['throughput_tokens_per_s']:,.1f} completion tok/s "
                     f"{s['throughput_from']} x {s['engine_instances']} engine instance(s)")
        out.append(line)
        out += [f"{name}: {n}" for n in s.get("notes", [])]
    out += est.get("notes", [])
    return out


def write_json(est: dict[str, Any], path: str) -> None:
    from curate.pipeline.io import atomic_write_bytes, get_fs

    fs, p = get_fs(path)
    parent = os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    atomic_write_bytes(fs, p, (json.dumps(est, indent=2, sort_keys=False) + "\n").encode())


def estimate_pipeline(pipe: Pipeline, *, sample: int = 20, seed: int = 0, no_call: bool = False,
                      scratch: str | None = None, workers: int | None = None, progress: bool = False,
                      json_path: str | None = None) -> dict[str, Any]:
    """The estimate of ``pipe`` (see the module docstring); written to ``<scratch>/estimate.json``
    and to ``json_path`` when given. The library equivalent of ``curate estimate``."""
    est = Estimator(pipe, sample=sample, seed=seed, no_call=no_call, scratch=scratch, workers=workers,
                    progress=progress).run()
    write_json(est, est["scratch"].rstrip("/") + "/" + ESTIMATE_FILE)
    if json_path:
        write_json(est, json_path)
    return est


# ------------------------------------------------------------------------------------------------
# estimate vs actual (a run with an estimate)


def load_estimate(path: str) -> dict[str, Any] | None:
    from curate.pipeline.io import get_fs

    fs, p = get_fs(path)
    try:
        with fs.open(p, "rb") as f:
            data = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and "steps" in data else None


def compare(estimate: dict[str, Any], pipe: Pipeline, stats: dict[str, dict]) -> dict[str, Any]:
    """Estimate vs actual per LLM step of the run (``stats``: the run's per-step stats). A step whose
    fingerprint changed since the estimate is listed as stale, without numbers."""
    out: dict[str, Any] = {"file": estimate.get("_path"), "created": estimate.get("created"),
                           "sample": estimate.get("sample"), "steps": {}}
    for name, e in (estimate.get("steps") or {}).items():
        step = pipe.steps.get(name)
        if step is None or name not in stats:
            continue
        if e.get("fingerprint") != step.fingerprint:
            out["steps"][name] = {"stale": True, "note": "the step's options or inputs changed since the estimate"}
            continue
        s = stats[name]
        counters = {**s.get("counters", {}), **{f"errors/{k}": v for k, v in s.get("errors", {}).items()}}
        actual = llm_numbers(counters)
        actual["seconds"] = s.get("seconds")
        actual["input_rows"] = s.get("in")
        actual["output_rows"] = s.get("out")
        est = {k: e.get(k) for k in (*NUMBERS, "parse_failure_rate", "input_rows", "output_rows")}
        out["steps"][name] = {"estimated": est, "actual": {k: actual.get(k) for k in est},
                              "status": s.get("status")}
    return out


def comparison_table(cmp: dict[str, Any]) -> str:
    head = ("step", "", "input rows", "requests", "prompt tok", "completion tok", "cost", "time", "parse fail")
    rows = [head]
    for name, c in cmp["steps"].items():
        if c.get("stale"):
            rows.append((name, "stale", "", "", "", "", "", "", ""))
            continue
        for which in ("estimated", "actual"):
            v = c[which]
            rows.append((name if which == "estimated" else "", which, _num(v.get("input_rows")),
                         _num(v.get("requests")), _num(v.get("prompt_tokens")), _num(v.get("completion_tokens")),
                         _num(v.get("cost"), "cost"), _num(v.get("seconds"), "time"),
                         _num(v.get("parse_failure_rate"), "pct")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_estimate(estimate: dict[str, Any] | None, steps: list[Step]) -> dict[str, float] | None:
    """Projected requests and cost of the LLM steps among ``steps`` (a segment), for the progress line."""
    if not estimate:
        return None
    req = cost = 0.0
    found = False
    for st in steps:
        e = (estimate.get("steps") or {}).get(st.name)
        if e and e.get("fingerprint") == st.fingerprint and e.get("requests") is not None:
            found = True
            req += e["requests"]
            cost += e.get("cost") or 0.0
    return {"requests": req, "cost": cost} if found else None


__all__ = ["Estimator", "EstimateError", "estimate_pipeline", "estimate_table", "estimate_notes", "load_estimate",
           "compare", "comparison_table", "default_scratch", "llm_numbers", "TokenCounter"]
