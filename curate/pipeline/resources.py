"""What the steps of a pipeline ask of the machines that run them, checked before any work.

A step's resources are its stage's (``Stage.resources``; an LLM stage's come from its engine) with
the fields its ``resources:`` in pipeline.yaml sets on top (``gpus``, ``cpus``, ``memory_gb``,
``replicas``, ``max_retries``). Runners compare them with what they have (the nodes of a Ray
cluster, or this machine) when a run starts, so that a step no worker can hold is a config error
naming the file, the step and the key (exit 2), not a hang or a failure halfway through a run.

Also here: the environment variables a pipeline needs in workers on other machines
(``forwarded_env``), which ``runner: ray`` passes through Ray's runtime environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from curate.pipeline.stage import Resources


@dataclass(frozen=True)
class Node:
    """What one machine offers a worker (None: unknown, not checked)."""

    cpus: float | None
    gpus: float
    memory_gb: float | None


def step_where(pipe: Any, name: str) -> str:
    """A step's place in the pipeline file, as config errors name it."""
    if name in pipe.spec.inputs:
        return f"input {name!r}"
    for i, s in enumerate(pipe.spec.stages):
        if (s.name or s.stage) == name:
            return f"stage {name!r} (stages[{i}])"
    return f"step {name!r}"


def worker_steps(pipe: Any) -> list[Any]:
    """Steps whose work runs in workers (sources and map stages; global steps run in the driver)."""
    return [s for s in pipe.steps.values() if s.stage.kind in ("source", "map")]


def check_resources(pipe: Any, nodes: list[Node], where_label: str) -> list[tuple[str, str]]:
    """(where, message) problems of steps whose workers fit on none of ``nodes``, or whose
    ``replicas`` do not fit on all of them together. ``where_label``: "the Ray cluster"..."""
    problems: list[tuple[str, str]] = []
    for step in worker_steps(pipe):
        r: Resources = step.stage.resources
        own = step.spec.resources.model_fields_set if step.spec.resources is not None else set()
        label = step_where(pipe, step.name)

        def where(key: str) -> str:
            return f"{label}: key 'resources.{key}'" if key in own else label

        def origin(key: str) -> str:
            return "" if key in own else " (the stage's own need; set `resources:` on the step to change it)"

        fit = [n for n in nodes if n.gpus >= r.gpus and (n.cpus is None or n.cpus >= r.cpus)
               and (r.memory_gb is None or n.memory_gb is None or n.memory_gb >= r.memory_gb)]
        if not fit:
            most_gpus = max((n.gpus for n in nodes), default=0.0)
            most_cpus = max((n.cpus or 0.0 for n in nodes), default=0.0)
            most_mem = max((n.memory_gb or 0.0 for n in nodes), default=0.0)
            if most_gpus < r.gpus:
                total = sum(n.gpus for n in nodes)
                problems.append((where("gpus"), f"needs {r.gpus:g} GPU(s) per worker but {where_label} has "
                                 + (f"{total:g}" if most_gpus == total else f"at most {most_gpus:g} on one node")
                                 + origin("gpus")))
            elif any(n.cpus is not None for n in nodes) and most_cpus < r.cpus:
                problems.append((where("cpus"), f"needs {r.cpus:g} CPU(s) per worker but {where_label} has at "
                                 f"most {most_cpus:g} on one node{origin('cpus')}"))
            else:
                problems.append((where("memory_gb"), f"needs {r.memory_gb:g} GB of memory per worker but "
                                 f"{where_label} has at most {most_mem:.1f} GB on one node{origin('memory_gb')}"))
            continue
        if r.replicas and r.gpus > 0:
            room = sum(int(n.gpus // r.gpus) for n in fit)
            if r.replicas > room:
                problems.append((where("replicas"), f"{r.replicas} replicas of {r.gpus:g} GPU(s) each do not fit: "
                                 f"{where_label} has room for {room}"))
    return problems


def forwarded_env(pipe: Any) -> list[str]:
    """Names of the environment variables a pipeline's workers need from the process that runs it:
    those listed under ``env:``, the API keys its engines name (``api_key_env``) and, for object-store
    paths, the storage credentials (``AWS_*`` for ``s3://``, ``GOOGLE_APPLICATION_CREDENTIALS`` for
    ``gs://``). Only names: values are read when tasks are sent and never written anywhere."""
    names = list(pipe.spec.env)
    for step in pipe.steps.values():
        key = getattr(getattr(step.stage.config, "engine", None), "api_key_env", None)
        if key:
            names.append(key)
    for eng in pipe.spec.engines.values():
        if isinstance(eng, dict) and eng.get("api_key_env"):
            names.append(eng["api_key_env"])
    urls = _strings(pipe.spec.model_dump(mode="json"))
    if any(u.startswith(("s3://", "s3a://")) for u in urls):
        names += sorted(k for k in os.environ if k.startswith("AWS_"))
    if any(u.startswith(("gs://", "gcs://")) for u in urls):
        names.append("GOOGLE_APPLICATION_CREDENTIALS")
    return list(dict.fromkeys(names))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
