"""Run ``examples/init_sweep.sh`` (a 3-job Hydra sweep, then ``gradguard report``) and print, or write into
README (block ``init-sweep-report``), the first run's table and the comparison, as the command prints them.

    python examples/report_numbers.py [--write-readme]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._readme import write_block  # noqa: E402


def excerpt(out: str) -> str:
    """The first run's table and the comparison from ``gradguard report`` output."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("run: 0/"))
    end = next(i for i in range(first + 1, len(lines)) if lines[i].startswith(("run: ", "comparison")))
    comp = next(i for i, line in enumerate(lines) if line.strip() == "comparison")
    run0 = "\n".join(line.rstrip() for line in lines[first:end]).strip()
    table = "\n".join(line.rstrip() for line in lines[comp:]).strip()
    return f"```\n{run0}\n```\n\nand at the end\n\n```\n{table}\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="write the block into README.md")
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["bash", str(ROOT / "examples" / "init_sweep.sh"), str(Path(tmp) / "init_sweep")],
                              cwd=tmp, env=env, capture_output=True, text=True, check=True)
    # the report names runs relative to the sweep folder, so the temporary path does not show
    body = excerpt(proc.stdout)
    print(body)
    if args.write_readme:
        write_block("init-sweep-report", body)


if __name__ == "__main__":
    main()
