"""Mutation testing of the torch-only core with mutmut: how many deliberately broken versions the tests catch.

For each module it copies the repository's tracked files into a scratch folder, configures mutmut to mutate
that one module and to run only that module's fast unit tests (no Trainer-driven integration tests, so a run
finishes on 2 cores), runs it, and prints killed / survived / timeout / no-tests counts and the score
``killed / (all - equivalent)``. Mutants listed in ``benchmarks/mutation_equivalent.txt`` (one
``mutant-name  # reason`` per line) are counted as equivalent.

Needs ``pip install mutmut`` (3.x). Usage::

    python benchmarks/mutation.py clipping            # one module
    python benchmarks/mutation.py clipping init stats health --max-children 2

Cost measured on a loaded 2-core machine: about 5 s per mutant for clipping.py with the property tests as the
runner (271 mutants), so all four modules take hours; run it per module.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the unit tests that exercise each module without a Trainer
RUNNERS = {
    "clipping": ["tests/test_properties.py", "tests/test_clipping.py", "-k", "not fit and not trainer and not hydra"],
    "init": ["tests/test_properties.py", "tests/test_init.py", "tests/test_keras_parity.py", "-k", "not callback and not fit and not hydra"],
    "stats": ["tests/test_properties.py", "tests/test_monitor.py", "-k", "not fit and not trainer"],
    "health": ["tests/test_monitor.py", "-k", "detector or finding or health"],
}


def equivalent() -> set[str]:
    path = ROOT / "benchmarks" / "mutation_equivalent.txt"
    if not path.exists():
        return set()
    return {line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def run(module: str, max_children: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            dst = Path(tmp, f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst)
        selection = RUNNERS[module]
        with open(Path(tmp, "pyproject.toml"), "a") as fh:
            fh.write(
                "\n[tool.mutmut]\n"
                'source_paths = ["lightning_gradguard"]\n'
                f'only_mutate = ["lightning_gradguard/{module}.py"]\n'
                f"pytest_add_cli_args_test_selection = {selection!r}\n".replace("'", '"')
                + 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-o", "addopts="]\n'
                'process_isolation = "forkserver"\n'
            )
        subprocess.run(["git", "init", "-q", "."], cwd=tmp, check=True)
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)], cwd=tmp,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=tmp, capture_output=True,
                             text=True).stdout
    counts = {"killed": 0, "survived": 0, "timeout": 0, "no tests": 0, "other": 0, "equivalent": 0}
    eq = equivalent()
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if not m:
            continue
        name, status = m.group(1), m.group(2).strip()
        if name in eq:
            counts["equivalent"] += 1
        elif status in counts:
            counts[status] += 1
        else:
            counts["other"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", choices=sorted(RUNNERS))
    parser.add_argument("--max-children", type=int, default=2)
    args = parser.parse_args()
    print(f"{'module':<10} {'mutants':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'no tests':>9} {'equiv':>6} {'score':>6}")
    for module in args.modules:
        c = run(module, args.max_children)
        total = sum(c.values())
        caught = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught too
        denom = max(1, total - c["equivalent"])
        print(f"{module:<10} {total:>8} {c['killed']:>7} {c['timeout']:>8} {c['survived']:>9} {c['no tests']:>9} "
              f"{c['equivalent']:>6} {caught / denom:>6.1%}", flush=True)


if __name__ == "__main__":
    main()
