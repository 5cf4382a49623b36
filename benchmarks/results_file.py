"""Where a benchmark's figures go: benchmarks/results/NAME.json (the figures) and NAME.md (the table
it printed), both headed by the machine and the commit they were measured on, so that the docs
quote a file that says where its figures come from."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    """The CPU, the machine's cores, the commit (with "+changes" when tracked files other than the
    results differ from it), today's date and the load average: figures on a shared machine move with its load."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    # the results of another benchmark of the same run are not a change to the code measured
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!benchmarks/results"], cwd=REPO, capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(),
            "commit": commit.strip() + ("+changes" if dirty else ""),
            "load_average_at_end": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d")}


def write_results(script: str, figures: dict, text: str, out: Path | None = None) -> Path:
    """Write FIGURES to OUT (default benchmarks/results/<SCRIPT without bench_>.json) and TEXT, the
    table SCRIPT printed, beside it as .md, both with machine(). Returns the JSON's path."""
    name = Path(script).stem
    out = out or RESULTS / f"{name.removeprefix('bench_')}.json"
    m = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": f"benchmarks/{name}.py", "machine": m, **figures}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# `benchmarks/{name}.py`\n\n{m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores "
        f"(load average {m['load_average_at_end']} at the end)\n\n{text}\n")
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return out
