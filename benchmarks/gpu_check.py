"""GPU path check: curate's GPU code paths against plain loops on one GPU, in one JSON file.

    python benchmarks/gpu_check.py --out result.json          # on a GPU machine (< 8 minutes)
    python benchmarks/gpu_check.py --dry-run --out dry.json   # tiny shapes on the CPU (~1 minute)

Nothing is downloaded. Models are built from configs with random weights and saved to a temp
folder with a tokenizer trained offline (``curate/testing/tiny_hf.py``); texts are generated.

Parts (each one ``ok``, ``skipped`` with the reason, or ``failed`` with the error):

``generate``     a SmolLM2-1.7B-shaped Llama (hidden 2048, 24 layers, 32 heads, 32 KV heads,
                 intermediate 8192, vocab 49152; bf16) through curate's ``transformers`` engine
                 in a ``generate`` step (library call on an Arrow table; the engine alone when
                 pyarrow is missing) vs the same prompts through a plain batched
                 ``model.generate`` loop on the same loaded model: output tokens/s and the ratio.
                 Both do the same work: greedy decoding, EOS and pad made unreachable (their
                 embedding rows are zero, so their logit is 0 while the argmax of 49k random
                 logits is positive), and the plain loop also sets ``min_new_tokens``; the number
                 of generated tokens is checked on both sides.
``hf_classify``  a DeBERTa-v3-base-shaped multi-label classifier (hidden 768, 12 layers) through
                 the ``hf_classify`` stage (length-sorted token-budget batches, bf16) vs a plain
                 batched forward loop (tokenizer padding per batch of inputs in order, bf16):
                 docs/s, the ratio and the largest score difference.
``pinning``      a pipeline under the local runner (``curate run`` in a subprocess) with a GPU
                 step (``resources.gpus = 1``) that records ``CUDA_VISIBLE_DEVICES`` and
                 ``torch.cuda.device_count()`` in each worker: each worker must see exactly one
                 device, one of the machine's. In ``--dry-run`` two fake devices (``0,1``) are
                 declared, so the pinning logic itself is exercised on the CPU.
``gpu_monitor``  ``nvidia-smi`` sampled every 0.5 s in a thread: utilisation and memory per part.

Targets: ``generate.ratio`` and ``hf_classify.ratio`` >= 0.95 (curate at least 95% of the plain
loop); they are reported under ``targets``. The script needs torch and transformers (and
tokenizers, which transformers brings); the ``generate`` step and ``hf_classify`` stage also need
pyarrow and pydantic, the pinning part all of curate's dependencies: what is missing is listed
under ``packages`` and the parts that need it are skipped, so the script always writes its JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "pydantic", "pyarrow", "packaging", "jinja2",
            "yaml", "click", "fsspec", "zstandard")
TARGET = 0.95

# shapes: (gpu, dry-run)
SHAPES = {
    "gpu": {"lm": dict(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192, vocab_size=49152),
            "prompts": 256, "new_tokens": 128, "lm_batch": 64,
            "clf": dict(arch="deberta", hidden=768, layers=12, heads=12, intermediate=3072, max_positions=512),
            "docs": 4096, "max_words": 400, "clf_batch": 64, "batch_tokens": 32768, "max_length": 512},
    "dry": {"lm": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab_size=4096),
            "prompts": 16, "new_tokens": 8, "lm_batch": 8,
            "clf": dict(arch="deberta", hidden=32, layers=2, heads=2, intermediate=64, max_positions=128),
            "docs": 64, "max_words": 80, "clf_batch": 16, "batch_tokens": 2048, "max_length": 128},
}


def dtype_kw(dtype: Any) -> dict[str, Any]:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older) for ``from_pretrained``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"yaml": "PyYAML"}
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a missing or broken package: reported, parts skipped)
            out[name] = None
            continue
        try:
            out[name] = version(dist.get(name, name))
        except PackageNotFoundError:
            out[name] = "installed"
    return out


class GpuMonitor(threading.Thread):
    """Samples ``nvidia-smi`` (utilisation %, memory MiB of every GPU) every ``interval`` s."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.exe = shutil.which("nvidia-smi")
        self.samples: list[tuple[float, float, float]] = []   # (time, util %, memory used MiB), GPU summed
        self.stop_event = threading.Event()
        self.error: str | None = None if self.exe else "nvidia-smi not found"

    def run(self) -> None:
        while self.exe and not self.stop_event.is_set():
            try:
                out = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
                rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]
                if rows:
                    self.samples.append((time.time(), max(r[0] for r in rows), sum(r[1] for r in rows)))
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            self.stop_event.wait(self.interval)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "util_mean": round(sum(x[1] for x in s) / len(s), 1),
                "util_max": max(x[1] for x in s), "memory_max_mib": max(x[2] for x in s)}


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.shape = SHAPES["dry" if self.dry else "gpu"]
        self.tmp = tempfile.mkdtemp(prefix="curate-gpu-check-")
        self.packages = package_versions()
        self.monitor = GpuMonitor()
        self.result: dict[str, Any] = {
            "mode": "dry-run" if self.dry else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "python": sys.version.split()[0], "packages": self.packages,
            "missing": [k for k, v in self.packages.items() if v is None], "device": None, "parts": {},
            "gpu_monitor": {}, "targets": {}, "seconds": None}
        self.device = "cpu"

    def need(self, *mods: str) -> str | None:
        missing = [m for m in mods if self.packages.get(m) is None]
        return f"missing package(s): {', '.join(missing)}" if missing else None

    def part(self, name: str, fn: Callable[[], dict[str, Any]], *mods: str) -> None:
        reason = self.need(*mods)
        t0 = time.time()
        if reason:
            self.result["parts"][name] = {"status": "skipped", "reason": reason}
        else:
            try:
                self.result["parts"][name] = {"status": "ok", **fn()}
            except Exception as exc:  # noqa: BLE001  (one part failing must not lose the others)
                self.result["parts"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                              "traceback": traceback.format_exc()[-3000:]}
        self.result["parts"][name]["seconds"] = round(time.time() - t0, 2)
        self.result["gpu_monitor"][name] = self.monitor.window(t0, time.time())
        self.write()
        print(f"[gpu_check] {name}: {self.result['parts'][name]['status']} "
              f"({self.result['parts'][name]['seconds']} s)", flush=True)

    def write(self) -> None:
        tmp = self.args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=2, default=str)
        os.replace(tmp, self.args.out)

    # -- parts ---------------------------------------------------------------------------------
    def setup_device(self) -> dict[str, Any]:
        import torch

        if not self.dry and not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU visible to torch (use --dry-run for the CPU check)")
        self.device = "cpu" if self.dry else "cuda"
        if self.dry:
            torch.set_num_threads(1)   # tiny shapes: threads only contend (the test runs beside others)
        info: dict[str, Any] = {"torch_device": self.device, "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.result["device"] = info
        return info

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def generate(self) -> dict[str, Any]:
        import torch

        from curate.testing.tiny_hf import make_texts, tiny_causal_lm

        sh = self.shape
        n, new, bs = sh["prompts"], sh["new_tokens"], sh["lm_batch"]
        prompts = make_texts(n, seed=5, min_words=20, max_words=60)
        folder = os.path.join(self.tmp, "lm")
        dtype = torch.float32 if self.dry else torch.bfloat16
        t = time.time()
        tiny_causal_lm(folder, texts=prompts, dtype=dtype, device=self.device, max_positions=4096,
                       never_stop=True, **sh["lm"])
        build_s = time.time() - t
        engine_cfg = {"kind": "transformers", "model": folder, "device": self.device,
                      "dtype": "float32" if self.dry else "bfloat16", "batch_size": bs}
        if self.dry:
            engine_cfg["num_threads"] = 1
        from curate.engines import Request, SamplingParams, make_engine

        engine = make_engine(engine_cfg).load()
        model, tok = engine.model, engine.tokenizer
        tok.padding_side = "left"
        n_params = sum(p.numel() for p in model.parameters())

        # plain loop: what a user writes with transformers, batches in input order, left padding
        def plain() -> int:
            total = 0
            with torch.inference_mode():
                for s in range(0, n, bs):
                    enc = tok(prompts[s:s + bs], return_tensors="pt", padding=True).to(model.device)
                    out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                    total += int((out[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
            self._sync()
            return total

        use_stage = self.packages.get("pyarrow") is not None
        if use_stage:
            import pyarrow as pa

            from curate.stages.synth.generate import Generate

            stage = Generate(engine=engine_cfg, prompt_column="text", chat=False, max_tokens=new,
                             batch_size=n, cache=False, output_column="gen")
            table = pa.table({"id": [f"p{i}" for i in range(n)], "text": prompts})

            def curate() -> int:
                out = stage(table)
                self._sync()
                return int(sum(out["gen_tokens"].to_pylist()))
        else:
            reqs = [Request(prompt=p, params=SamplingParams(max_tokens=new)) for p in prompts]

            def curate() -> int:
                out = engine.generate(reqs)
                self._sync()
                return sum(c.completion_tokens for c in out)

        warm = min(n, bs)
        with torch.inference_mode():   # warm-up: kernels, allocator
            enc = tok(prompts[:warm], return_tensors="pt", padding=True).to(model.device)
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        self._sync()
        res: dict[str, Any] = {"path": "generate stage (library call)" if use_stage else "engine.generate (no pyarrow)",
                               "model_params": n_params, "prompts": n, "new_tokens": new, "batch_size": bs,
                               "dtype": str(dtype), "build_seconds": round(build_s, 1)}
        order = ["plain", "curate"] if not self.args.curate_first else ["curate", "plain"]
        for name in order:
            fn = plain if name == "plain" else curate
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            tokens = fn()
            dt = time.perf_counter() - t
            res[name] = {"seconds": round(dt, 3), "output_tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}
            if self.device == "cuda":
                res[name]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["same_work"] = res["plain"]["output_tokens"] == res["curate"]["output_tokens"] == n * new
        res["ratio"] = round(res["curate"]["tokens_per_s"] / res["plain"]["tokens_per_s"], 3)
        engine.close()
        del engine, model
        self._free()
        return res

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def hf_classify(self) -> dict[str, Any]:
        import numpy as np
        import torch

        from curate.testing.tiny_hf import make_texts, tiny_classifier

        sh = self.shape
        texts = make_texts(sh["docs"], seed=9, max_words=sh["max_words"])
        folder = os.path.join(self.tmp, "clf")
        clf_shape = dict(sh["clf"])
        tiny_classifier(folder, clf_shape.pop("arch"), problem_type="multi_label_classification",
                        labels=["low", "medium", "high"], texts=texts, vocab_size=32000, **clf_shape)
        dtype_name = "float32" if self.dry else "bfloat16"
        dtype = getattr(torch, dtype_name)
        L, bs = sh["max_length"], sh["clf_batch"]
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, **dtype_kw(dtype)).to(self.device).eval()

        def plain() -> np.ndarray:
            out = []
            with torch.inference_mode():
                for s in range(0, len(texts), bs):
                    enc = tok(texts[s:s + bs], padding=True, truncation=True, max_length=L,
                              return_tensors="pt").to(self.device)
                    out.append(torch.sigmoid(model(**enc).logits.float()).cpu().numpy())
            self._sync()
            return np.concatenate(out)

        use_stage = self.packages.get("pyarrow") is not None and self.packages.get("pydantic") is not None
        if use_stage:
            import pyarrow as pa

            from curate.stages.score.hf_classify import HfClassify

            stage = HfClassify(model=folder, device=self.device, dtype=dtype_name, max_length=L,
                               batch_tokens=sh["batch_tokens"], max_batch_size=256, prefix="q_")
            stage.ensure_setup()
            table = pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})

            def curate() -> np.ndarray:
                out = stage(table)
                self._sync()
                return np.stack([out[c].to_numpy() for c in ("q_low", "q_medium", "q_high")], 1)
        else:
            from curate.stages.score._hf_classifier import SequenceClassifier

            sc = SequenceClassifier(folder, device=self.device, dtype=dtype_name, max_length=L,
                                    batch_tokens=sh["batch_tokens"], max_batch_size=256).load()

            def curate() -> np.ndarray:
                out = sc.scores(texts)
                self._sync()
                return out

        plain()   # warm-up
        res: dict[str, Any] = {"path": "hf_classify stage (library call)" if use_stage else
                               "SequenceClassifier (no pyarrow/pydantic)", "docs": len(texts),
                               "max_length": L, "plain_batch_size": bs, "batch_tokens": sh["batch_tokens"],
                               "dtype": dtype_name}
        outs = {}
        for name, fn in (("plain", plain), ("curate", curate)):
            t = time.perf_counter()
            outs[name] = fn()
            dt = time.perf_counter() - t
            res[name] = {"seconds": round(dt, 3), "docs_per_s": round(len(texts) / dt, 1)}
        res["ratio"] = round(res["curate"]["docs_per_s"] / res["plain"]["docs_per_s"], 3)
        res["max_abs_score_diff"] = float(np.abs(outs["curate"] - outs["plain"]).max())
        del model
        self._free()
        return res

    def pinning(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import yaml

        d = os.path.join(self.tmp, "pin")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gpu_probe.py"), "w") as f:
            f.write(PROBE)
        n_files = 4
        for i in range(n_files):
            pq.write_table(pa.table({"id": [f"f{i}-{j}" for j in range(20)], "text": ["x"] * 20}),
                           os.path.join(d, f"in{i}.parquet"))
        spec = {"name": "pin", "output": os.path.join(d, "out"), "workers": 2, "plugins": ["gpu_probe"],
                "inputs": {"docs": {"stage": "read_parquet", "options": {"paths": os.path.join(d, "in*.parquet")}}},
                "stages": [{"stage": "gpu_probe"}]}
        path = os.path.join(d, "pipeline.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT, d, env.get("PYTHONPATH", "")])
        from curate.pipeline.local_executor import visible_gpu_ids

        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = "0,1"     # two declared devices: the pinning logic runs on CPU
        expected = ["0", "1"] if self.dry else visible_gpu_ids()
        r = subprocess.run([sys.executable, "-m", "curate.cli", "run", "-q", path], env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"curate run exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
        t = pq.read_table(os.path.join(d, "out", "gpu_probe")).to_pylist()
        seen = sorted({(row["cuda_visible_devices"], row["torch_device_count"], row["pid"]) for row in t})
        per_worker = [{"CUDA_VISIBLE_DEVICES": s[0], "torch_device_count": s[1], "pid": s[2]} for s in seen]
        ok = bool(seen) and all(s[0] is not None and "," not in s[0] and s[0] in expected for s in seen) \
            and (self.dry or all(s[1] == 1 for s in seen))
        return {"pinned": ok, "expected_devices": expected, "workers": per_worker, "rows": len(t),
                "declared_fake_devices": self.dry}

    def run(self) -> None:
        t0 = time.time()
        self.monitor.start()
        self.part("device", self.setup_device, "torch")
        if self.result["parts"]["device"]["status"] != "ok":
            for name in ("generate", "hf_classify", "pinning"):
                self.result["parts"][name] = {"status": "skipped", "reason": "no usable device"}
        else:
            self.part("generate", self.generate, "torch", "transformers", "tokenizers", "pydantic", "jinja2")
            self.part("hf_classify", self.hf_classify, "torch", "transformers", "tokenizers", "numpy")
            self.part("pinning", self.pinning, "torch", "pyarrow", "pydantic", "yaml", "click", "fsspec")
        self.monitor.stop_event.set()
        self.result["gpu_monitor"]["error"] = self.monitor.error
        self.result["gpu_monitor"]["all"] = self.monitor.window(t0, time.time())
        for name in ("generate", "hf_classify"):
            p = self.result["parts"].get(name, {})
            ratio = p.get("ratio")
            self.result["targets"][f"{name}_ratio"] = {"value": ratio, "target": TARGET,
                                                       "met": ratio is not None and ratio >= TARGET}
        pin = self.result["parts"].get("pinning", {})
        self.result["targets"]["pinning"] = {"met": bool(pin.get("pinned"))}
        self.result["seconds"] = round(time.time() - t0, 1)
        self.write()
        shutil.rmtree(self.tmp, ignore_errors=True)


PROBE = '''
import os

import pyarrow as pa

from curate.pipeline.stage import MapStage, Resources, StageConfig, register


@register
class GpuProbe(MapStage):
    """Records the devices a worker sees (gpu_check's pinning part)."""
    name = "gpu_probe"
    Config = StageConfig
    resources = Resources(cpus=1.0, gpus=1.0)

    def setup(self):
        try:
            import torch
            self._count = torch.cuda.device_count()
        except ImportError:
            self._count = -1

    def process(self, table):
        n = table.num_rows
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        table = table.append_column("cuda_visible_devices", pa.array([env] * n, pa.string()))
        table = table.append_column("torch_device_count", pa.array([self._count] * n, pa.int32()))
        return table.append_column("pid", pa.array([os.getpid()] * n, pa.int64()))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON result file")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (what the test runs)")
    ap.add_argument("--curate-first", action="store_true", help="time curate's path before the plain loop")
    args = ap.parse_args(argv)
    check = Check(args)
    check.run()
    res = check.result
    print(f"[gpu_check] wrote {args.out} ({res['seconds']} s)")
    for name, t in res["targets"].items():
        print(f"[gpu_check]   {name}: {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
