"""Print curate's requirements (core dependencies plus the named extras) from pyproject.toml.

The images install these before copying the source, so a change to the code reuses the dependency
layer:  python requirements.py llm s3 > requirements.txt
"""

import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project.get("optional-dependencies", {})
unknown = [e for e in sys.argv[1:] if e not in extras]
if unknown:
    sys.exit(f"pyproject.toml: unknown extra(s) {unknown}; known: {sorted(extras)}")
print("\n".join(project["dependencies"] + [r for e in sys.argv[1:] for r in extras[e]]))
