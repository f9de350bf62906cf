"""The vLLM contract: every vLLM name and argument ``curate/engines/vllm_engine.py`` uses, and a
check of them against a real vLLM release's source, without importing vLLM (no GPU, no CUDA).

    python -m curate.engines.vllm_contract                   # the releases in CHECKED_VERSIONS
    python -m curate.engines.vllm_contract --version 0.33.0  # one release (pip download --no-deps)
    python -m curate.engines.vllm_contract --wheel /tmp/vllm-0.33.0-*.whl   # a wheel you have
    python -m curate.engines.vllm_contract --src /path/to/site-packages     # an installed vllm

``make vllm-contract`` runs the first form. Each release's wheel is fetched with
``pip download vllm==X --no-deps`` (into ``$CURATE_VLLM_CONTRACT_DIR``, default
``/tmp/curate-vllm-contract``) and its Python sources are read straight from the wheel with
``ast``: class fields, method signatures, enum members and exported names.

What is checked (:func:`contract`): the keyword arguments the adapter gives ``vllm.SamplingParams``
(every key :func:`~curate.engines.vllm_engine.sampling_kwargs` can produce, plus ``output_kind``;
``structured_outputs`` for answer schemas) and ``vllm.sampling_params.StructuredOutputsParams``
(``json``), the names imported from ``vllm.sampling_params``,
and ``vllm.LLM`` (every key :func:`~curate.engines.vllm_engine.llm_kwargs` can produce: ``LLM``'s
own parameters or, through its ``**kwargs``, ``EngineArgs`` fields); ``LLM.generate``,
``LLM.chat`` and ``LLM.get_tokenizer``; ``LLM.llm_engine`` and the ``LLMEngine`` methods the
streaming feeder calls (``add_request(request_id, prompt, params)``, ``step``,
``abort_request``); the ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` attributes read by
``completion_from_output``; ``RequestOutputKind.FINAL_ONLY``; and that the release is inside
:data:`~curate.engines.vllm_engine.SUPPORTED_VLLM`. The tests' fake ``vllm`` module accepts only
these names, so the adapter cannot use a name this check does not cover.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

# the releases `make vllm-contract` checks: the lowest and the highest of SUPPORTED_VLLM
CHECKED_VERSIONS = ("0.11.0", "0.33.0")

# where each class is looked for first (relative to the vllm package); then anywhere in it
CLASS_FILES = {
    "SamplingParams": ["sampling_params.py"],
    "RequestOutputKind": ["sampling_params.py"],
    "LLM": ["entrypoints/llm.py"],
    "LLMEngine": ["v1/engine/llm_engine.py", "engine/llm_engine.py"],
    "EngineArgs": ["engine/arg_utils.py"],
    "RequestOutput": ["outputs.py"],
    "CompletionOutput": ["outputs.py"],
    "Logprob": ["logprobs.py", "sequence.py"],
    "StructuredOutputsParams": ["sampling_params.py"],
    "GuidedDecodingParams": ["sampling_params.py"],
}


def used_sampling_kwargs() -> list[str]:
    """Every keyword ``VLLMEngine`` can give ``vllm.SamplingParams``."""
    from curate.engines.base import SamplingParams
    from curate.engines.vllm_engine import sampling_kwargs

    from curate.engines.base import AnswerSchema

    keys: set[str] = {"output_kind"}       # set by the streaming path (FINAL_ONLY)
    schema = AnswerSchema(name="a", schema_text='{"type": "object"}')
    for p in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, stop=["x"], seed=1,
                                               n=3, logprobs=2)):
        keys |= set(sampling_kwargs(p)) | set(sampling_kwargs(p, schema))
    return sorted(keys)


def used_structured_kwargs() -> list[str]:
    """Every keyword ``VLLMEngine`` gives ``vllm.sampling_params.StructuredOutputsParams``."""
    from curate.engines.base import AnswerSchema, SamplingParams
    from curate.engines.vllm_engine import sampling_kwargs

    kw = sampling_kwargs(SamplingParams(), AnswerSchema(name="a", schema_text='{"type": "object"}'))
    return sorted(kw["structured_outputs"])


def used_llm_kwargs() -> list[str]:
    """Every keyword ``VLLMEngine`` can give ``vllm.LLM`` (``engine_kwargs`` are the user's own)."""
    from curate.engines.config import VLLMConfig
    from curate.engines.vllm_engine import llm_kwargs

    full = VLLMConfig(model="/m", tokenizer="/t", max_model_len=4096, quantization="awq", max_num_seqs=8,
                      max_num_batched_tokens=8192, speculative_config={"method": "ngram"})
    return sorted(llm_kwargs(full))


def contract() -> dict[str, Any]:
    """The names and signatures the adapter relies on (see the module docstring)."""
    return {
        "exports": ["LLM", "SamplingParams"],
        # names imported from a vllm module other than the package: file -> names it must define or import
        "modules": {"sampling_params.py": ["SamplingParams", "RequestOutputKind", "StructuredOutputsParams"]},
        "classes": {
            "SamplingParams": {"fields": used_sampling_kwargs()},
            "StructuredOutputsParams": {"fields": used_structured_kwargs()},
            "RequestOutputKind": {"members": ["FINAL_ONLY"]},
            "LLM": {"init": used_llm_kwargs(),
                    "methods": {"generate": ["prompts", "sampling_params", "use_tqdm"],
                                "chat": ["messages", "sampling_params", "use_tqdm", "chat_template"],
                                "get_tokenizer": []},
                    "attributes": ["llm_engine"]},
            "LLMEngine": {"methods": {"add_request": ["request_id", "prompt", "params"], "step": [],
                                      "abort_request": ["request_ids"]},
                          "positional": {"add_request": ["request_id", "prompt", "params"]}},
            "RequestOutput": {"attributes": ["request_id", "prompt_token_ids", "outputs", "finished"]},
            "CompletionOutput": {"attributes": ["index", "text", "token_ids", "finish_reason", "logprobs"]},
            "Logprob": {"attributes": ["logprob", "rank", "decoded_token"]},
        },
    }


# -- reading a vllm source tree ------------------------------------------------------------------------
class Source:
    """The ``vllm`` package's Python files, from a wheel (read in place) or a folder."""

    def __init__(self, wheel: str | None = None, folder: str | None = None):
        self._zip = zipfile.ZipFile(wheel) if wheel else None
        self._folder = folder
        if self._zip is not None:
            self.files = sorted(n[len("vllm/"):] for n in self._zip.namelist()
                                if n.startswith("vllm/") and n.endswith(".py"))
        else:
            base = os.path.join(folder or "", "vllm")
            if not os.path.isdir(base):
                raise FileNotFoundError(f"no vllm package in {folder}")
            self.files = sorted(os.path.relpath(p, base) for p in glob.glob(os.path.join(base, "**", "*.py"),
                                                                             recursive=True))
        self._trees: dict[str, ast.Module] = {}

    def text(self, rel: str) -> str:
        if self._zip is not None:
            return self._zip.read("vllm/" + rel).decode("utf-8")
        with open(os.path.join(self._folder or "", "vllm", rel), encoding="utf-8") as f:
            return f.read()

    def tree(self, rel: str) -> ast.Module:
        if rel not in self._trees:
            self._trees[rel] = ast.parse(self.text(rel))
        return self._trees[rel]

    def version(self) -> str | None:
        for rel in ("_version.py", "version.py"):
            if rel in self.files:
                for node in ast.walk(self.tree(rel)):
                    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                            and isinstance(node.value.value, str) \
                            and any(isinstance(t, ast.Name) and t.id in ("__version__", "version")
                                    for t in node.targets):
                        return node.value.value
        return None

    def find_class(self, name: str) -> tuple[str, ast.ClassDef] | None:
        first = [f for f in CLASS_FILES.get(name, []) if f in self.files]
        for rel in first + [f for f in self.files if f not in first]:
            if rel not in first and f"class {name}" not in self.text(rel):
                continue
            for node in self.tree(rel).body:
                if isinstance(node, ast.ClassDef) and node.name == name:
                    return rel, node
        return None


def _class_names(cls: ast.ClassDef) -> set[str]:
    """Fields, attributes and members a class defines: class-level assignments and annotations,
    ``self.x = ...`` in its methods, properties and methods."""
    out: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
            for sub in ast.walk(node):
                targets = sub.targets if isinstance(sub, ast.Assign) else (
                    [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else [])
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        out.add(t.attr)
    return out


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], list[str], bool]:
    """(positional parameter names without self, keyword-only names, has **kwargs)."""
    a = fn.args
    pos = [x.arg for x in a.posonlyargs + a.args]
    if pos and pos[0] in ("self", "cls"):
        pos = pos[1:]
    return pos, [x.arg for x in a.kwonlyargs], a.kwarg is not None


def _module_names(tree: ast.Module) -> set[str]:
    """Names a module defines or imports at its top level (classes, functions, assignments, imports)."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def _exports(src: Source) -> set[str]:
    """Names ``from vllm import X`` can give: defined or imported in vllm/__init__.py, in its
    ``__all__``, or keys of a lazy-import table (``MODULE_ATTRS``)."""
    out: set[str] = set()
    for node in ast.walk(src.tree("__init__.py")):
        if isinstance(node, (ast.ImportFrom, ast.Import)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.Dict):
            out |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        elif isinstance(node, (ast.List, ast.Tuple)):
            out |= {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return out


@dataclass
class Report:
    version: str | None
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "ok": self.ok, "checked": self.checked, "problems": self.problems,
                "notes": self.notes}


def check_source(src: Source, spec: dict[str, Any] | None = None) -> Report:
    """Check ``spec`` (default :func:`contract`) against one vLLM source tree."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from curate.engines.vllm_engine import SUPPORTED_VLLM

    spec = spec or contract()
    rep = Report(src.version())
    bad = rep.problems.append

    def ok() -> None:
        rep.checked += 1

    if rep.version is None:
        bad("cannot read the vLLM version (vllm/_version.py, vllm/version.py)")
    elif not SpecifierSet(SUPPORTED_VLLM).contains(Version(rep.version), prereleases=True):
        bad(f"vLLM {rep.version} is outside SUPPORTED_VLLM ({SUPPORTED_VLLM})")
    else:
        ok()
    exports = _exports(src)
    for name in spec["exports"]:
        ok() if name in exports else bad(f"`from vllm import {name}`: vllm/__init__.py does not provide {name}")
    for rel, names in spec.get("modules", {}).items():
        module = "vllm." + rel[:-3].replace("/", ".")
        if rel not in src.files:
            bad(f"`{module}` ({rel}) does not exist")
            continue
        defined = _module_names(src.tree(rel))
        for name in names:
            ok() if name in defined else bad(f"`from {module} import {name}`: {rel} does not define {name}")

    engine_args = src.find_class("EngineArgs")
    engine_arg_names = _class_names(engine_args[1]) if engine_args else set()
    for cname, want in spec["classes"].items():
        found = src.find_class(cname)
        if found is None:
            bad(f"class {cname} not found in vllm")
            continue
        rel, cls = found
        names = _class_names(cls)
        for f in want.get("fields", []) + want.get("attributes", []) + want.get("members", []):
            ok() if f in names else bad(f"{cname} ({rel}) has no field/attribute {f!r}")
        if "init" in want:
            init = _method(cls, "__init__")
            if init is None:
                bad(f"{cname} ({rel}) has no __init__")
            else:
                pos, kwonly, var_kw = _params(init)
                for k in want["init"]:
                    if k in pos or k in kwonly:
                        ok()
                    elif var_kw and k in engine_arg_names:
                        ok()            # LLM(**kwargs) -> EngineArgs(**kwargs)
                    else:
                        bad(f"{cname}.__init__ ({rel}) takes no argument {k!r}"
                            + (" (nor does EngineArgs)" if var_kw else ""))
        for mname, args in want.get("methods", {}).items():
            fn = _method(cls, mname)
            if fn is None:
                bad(f"{cname}.{mname} ({rel}) does not exist")
                continue
            ok()
            pos, kwonly, _ = _params(fn)
            for a in args:
                ok() if a in pos or a in kwonly else bad(f"{cname}.{mname} ({rel}) has no parameter {a!r}")
            order = want.get("positional", {}).get(mname)
            if order is not None:
                ok() if pos[:len(order)] == order else bad(
                    f"{cname}.{mname} ({rel}) positional parameters are {pos[:len(order)]}, expected {order}")
    return rep


def download_wheel(version: str, dest: str) -> str:
    """The vllm wheel of ``version`` in ``dest`` (``pip download --no-deps`` when not there yet)."""
    os.makedirs(dest, exist_ok=True)
    have = glob.glob(os.path.join(dest, f"vllm-{version}-*.whl"))
    if have:
        return have[0]
    cmd = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
           "-d", dest, "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    have = glob.glob(os.path.join(dest, f"vllm-{version}-*.whl"))
    if r.returncode != 0 or not have:
        raise RuntimeError(f"pip download vllm=={version} failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return have[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="append", help="vLLM release(s) to check (default: %s)"
                    % ", ".join(CHECKED_VERSIONS))
    ap.add_argument("--wheel", action="append", help="check this vllm wheel file")
    ap.add_argument("--src", action="append", help="check the vllm package inside this folder (site-packages)")
    ap.add_argument("--cache", default=os.environ.get("CURATE_VLLM_CONTRACT_DIR", "/tmp/curate-vllm-contract"),
                    help="where wheels are downloaded (default %(default)s)")
    ap.add_argument("--json", help="write the reports to this JSON file")
    args = ap.parse_args(argv)
    sources: list[tuple[str, Source]] = []
    try:
        for w in args.wheel or []:
            sources.append((w, Source(wheel=w)))
        for s in args.src or []:
            sources.append((s, Source(folder=s)))
        if not sources:
            for v in args.version or CHECKED_VERSIONS:
                w = download_wheel(v, args.cache)
                sources.append((w, Source(wheel=w)))
    except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
        print(f"vllm-contract: {exc}", file=sys.stderr)
        return 2
    spec = contract()
    reports = []
    for where, src in sources:
        rep = check_source(src, spec)
        reports.append({"source": where, **rep.to_dict()})
        status = "ok" if rep.ok else f"FAILED ({len(rep.problems)} problem(s))"
        print(f"vLLM {rep.version}: {status}: {rep.checked} names and signatures checked ({where})")
        for p in rep.problems:
            print(f"  - {p}")
        for n in rep.notes:
            print(f"  note: {n}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"contract": spec, "reports": reports}, f, indent=2)
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
