"""Print curate's requirements (core dependencies plus the named extras) from pyproject.toml.

The images install these before copying the source, so a change to the code reuses the dependency
layer:  python requirements.py llm s3 > requirements.txt

With ``--constraints LOCK`` it prints instead the pins of LOCK (docker/requirements.lock) for the
packages this Python does not have yet: the GPU image's constraints, which leave vLLM, its torch
and everything else its base image installed at the base image's versions:
  python requirements.py --constraints requirements.lock > constraints.txt
"""

import importlib.metadata as md
import re
import sys
import tomllib

if sys.argv[1:2] == ["--constraints"]:
    if len(sys.argv) != 3:
        sys.exit("usage: requirements.py --constraints LOCK")
    have = {re.sub(r"[-_.]+", "-", d.name).lower() for d in md.distributions() if d.name}
    for line in open(sys.argv[2]):
        name = line.split("==")[0].strip()
        if line.strip() and not line.startswith("#") and re.sub(r"[-_.]+", "-", name).lower() not in have:
            print(line.strip())
    sys.exit(0)

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project.get("optional-dependencies", {})
unknown = [e for e in sys.argv[1:] if e not in extras]
if unknown:
    sys.exit(f"pyproject.toml: unknown extra(s) {unknown}; known: {sorted(extras)}")
print("\n".join(project["dependencies"] + [r for e in sys.argv[1:] for r in extras[e]]))
