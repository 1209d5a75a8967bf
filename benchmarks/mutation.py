"""Mutation testing of the torch-only core with mutmut: how many deliberately broken versions the tests catch.

For each module it copies the repository's tracked files into a scratch folder, configures mutmut to mutate
that one module and to run that module's unit tests (no Trainer-driven integration tests, so a run finishes
on 2 cores), runs it, and prints killed / survived / timeout / no-tests counts and the score
``(killed + timeout) / (all - equivalent)``. mutmut 3 runs, for each mutant, only the tests that called the
mutated function in a clean run, from a fork server that has imported torch and the tests once; the property
tests run with the Hypothesis profile ``mutation`` (fewer examples, ``GRADGUARD_HYPOTHESIS_PROFILE``, see
``tests/conftest.py``). Mutants listed in ``benchmarks/mutation_equivalent.txt`` (one ``mutant-name  # reason``
per line) are counted as equivalent: they behave exactly like the original, so no test can kill them.

Needs ``pip install mutmut`` (3.x, the ``dev`` extra). Usage::

    python benchmarks/mutation.py init                        # one module
    python benchmarks/mutation.py init --keep /tmp/mut        # keep mutmut's folder /tmp/mut/init: `mutmut results`,
                                                              # `mutmut show NAME` there
    python benchmarks/mutation.py init --keep /tmp/mut --rerun   # after adding tests: only the survivors again
    python benchmarks/mutation.py clipping init stats health --write-readme   # all four, score into README

``--write-readme`` replaces the README block ``mutation`` with the table of the modules run, keeping the rows of
modules not run this time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _readme import read_block, write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the unit tests that exercise each module without a Trainer (pytest arguments)
RUNNERS = {
    "clipping": ["tests/test_properties.py", "tests/test_clipping.py", "tests/test_clipping_core.py", "tests/test_zscore.py",
                 "tests/test_distributed.py", "-k",
                 "not (callback or accumulation or bf16 or manual_optimization or refuses_trainer or nonfinite_gradients "
                 "or survives_checkpoint or exploding_rnn or hydra or nonfinite_message or nonfinite_warning or real_fit "
                 "or injected_spikes or resume or gradguard_tries or lightning_cli or never_sync_on_gpu)"],
    "init": ["tests/test_properties.py", "tests/test_init.py", "tests/test_keras_parity.py", "tests/test_real_code.py",
             "tests/test_distributed.py",
             "-k", "not callback and not fit and not hydra and not trains and not resume and not configure_model"],
    "stats": ["tests/test_properties.py", "tests/test_stats.py", "tests/test_distributed.py"],
    "health": ["tests/test_diagnosis.py", "tests/test_health.py",
               "-k", "not fit and not trainer and not zoo and not architectures and not hugging and not players "
               "and not net_gets and not summary_says and not two_optimizers"],
}
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
HEADER = f"| {'module':<31} | mutants | killed | timeout | survived | no tests | equivalent | score |"


def equivalent() -> dict[str, str]:
    """mutant name → why it is equivalent (from ``benchmarks/mutation_equivalent.txt``)."""
    if not EQUIVALENT_FILE.exists():
        return {}
    out = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            out[name.strip()] = reason.strip()
    return out


def prepare(module: str, work: Path) -> None:
    """Copy the tracked files (and this checkout's uncommitted edits of them) into ``work``, add mutmut's config."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if not (ROOT / f).is_file():
            continue
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    selection = RUNNERS[module]
    with open(work / "pyproject.toml", "a") as fh:
        fh.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["lightning_gradguard"]\n'
            f'only_mutate = ["lightning_gradguard/{module}.py"]\n'
            f"pytest_add_cli_args_test_selection = {selection!r}\n".replace("'", '"')
            # pytest's unraisable/thread-exception plugins run gc.collect() at the end of every session: ~1 s with
            # torch and Lightning loaded, 10 times the tests of a mutant
            + 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", '
            '"no:threadexception", "-q", "-o", "addopts=", "-x"]\n'
            'process_isolation = "forkserver"\n'
            "use_git_change_detection = false\n"
        )
    if not (work / ".git").exists():
        subprocess.run(["git", "init", "-q", "."], cwd=work, check=True)


def mutmut(work: Path, *args: str, capture: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutants, not this checkout's code
    env["GRADGUARD_HYPOTHESIS_PROFILE"] = "mutation"
    exe = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    out = subprocess.run([exe, *args], cwd=work, env=env, text=True, capture_output=capture,
                         stdout=None if capture else subprocess.DEVNULL)
    return out.stdout if capture else ""


def count(module: str, results: str) -> tuple[dict[str, int], list[str]]:
    counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "other": 0, "equivalent": 0}
    eq = equivalent()
    survivors = []
    for line in results.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if not m or f".{module}." not in m.group(1):
            continue
        name, status = m.group(1), m.group(2).strip()
        if name in eq and status in ("killed", "timeout"):  # a test kills it after all: the list is wrong there
            print(f"warning: {name} is listed as equivalent but was {status}; counted as {status}", file=sys.stderr)
            counts[status] += 1
        elif name in eq:
            counts["equivalent"] += 1
        elif status in counts:
            counts[status] += 1
            if status != "killed" and status != "timeout":
                survivors.append(f"{name}: {status}")
        else:
            counts["other"] += 1
            survivors.append(f"{name}: {status}")
    return counts, survivors


def run(module: str, max_children: int, keep: Path | None, rerun: bool = False,
        results_only: bool = False) -> tuple[dict[str, int], list[str]]:
    if keep is not None and results_only:  # count what the runs in this folder found, run nothing
        return count(module, mutmut(keep, "results", "--all", "true", capture=True))
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        prepare(module, keep)
        # mutmut runs only the mutants without a result here (all of them the first time; after a change of the
        # module, those of the changed functions)
        mutmut(keep, "run", "--max-children", str(max_children))
        if rerun:  # and the mutants not killed so far, against the tests as they are now
            _, left = count(module, mutmut(keep, "results", "--all", "true", capture=True))
            names = [s.split(":")[0] for s in left]
            if names:
                mutmut(keep, "run", "--max-children", str(max_children), *names)
        return count(module, mutmut(keep, "results", "--all", "true", capture=True))
    with tempfile.TemporaryDirectory() as tmp:
        prepare(module, Path(tmp))
        mutmut(Path(tmp), "run", "--max-children", str(max_children))
        return count(module, mutmut(Path(tmp), "results", "--all", "true", capture=True))


def row(module: str, c: dict[str, int]) -> str:
    total = sum(c.values())
    caught = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught too
    denom = max(1, total - c["equivalent"])
    return (f"| {'lightning_gradguard/' + module + '.py':<31} | {total:>7} | {c['killed']:>6} | {c['timeout']:>7} | "
            f"{c['survived'] + c['other']:>8} | {c['no tests']:>8} | {c['equivalent']:>10} | {caught / denom:>5.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", choices=sorted(RUNNERS))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder (one per module: DIR/<module>) and keep it")
    parser.add_argument("--rerun", action="store_true",
                        help="with --keep: run again only the mutants not killed last time (after adding tests)")
    parser.add_argument("--results-only", action="store_true",
                        help="with --keep: only count the results of the runs already made in that folder")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README block `mutation`")
    args = parser.parse_args()
    print(HEADER)
    print("|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|")
    rows = {}
    for module in args.modules:
        start = time.perf_counter()
        c, survivors = run(module, args.max_children, args.keep / module if args.keep else None, args.rerun,
                           args.results_only)
        rows[module] = row(module, c)
        print(rows[module], flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        for s in survivors:
            print(f"  not killed: {s}", file=sys.stderr)
    if args.write_readme:
        old = {}
        for line in read_block("mutation").splitlines():
            m = re.match(r"\| lightning_gradguard/(\w+)\.py", line)
            if m:
                old[m.group(1)] = line
        old.update(rows)
        body = [HEADER, "|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|"]
        body += [old[m] for m in sorted(old)]
        how = ""
        if args.rerun:
            how = (": `--keep DIR --rerun` (a full run per module in DIR, then its survivors run again against the "
                   "final tests)")
        elif args.results_only:
            how = (": a full run per module with `--keep DIR`, its survivors run again with `--rerun` after tests were "
                   "added, then counted with `--keep DIR --results-only` (the modules' code unchanged since their full "
                   "runs)")
        if how:
            how = f". These rows{how}"
        body.append(f"\nReproduce: `python benchmarks/mutation.py {' '.join(sorted(old))} --write-readme` (a full run of "
                    f"each module){how}; mutmut 3, "
                    f"{dt.date.today().isoformat()}, 2-core machine; score = (killed + timeout) / (mutants − equivalent); "
                    f"the mutants not killed are printed by the script")
        write_block("mutation", "\n".join(body))


if __name__ == "__main__":
    main()
