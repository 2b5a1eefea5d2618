"""Mutation testing of hookvene's core modules with mutmut 3 (`make mutants`); writes mutation/REPORT.md.

Each group (a few modules and the fast tests that exercise them) runs in its own copy of the working tree
(`--workdir`, default /tmp/hookvene-mutants/<group>): mutmut never edits the files it mutates in place (it writes
mutated copies under `<copy>/mutants/`), and the copy keeps other people's test runs on this tree undisturbed.
One mutant at a time (`--jobs N`: N at once, mutmut's `--max-children`), torch on one thread each.

    python mutation/run_mutants.py                      # every group, then the report
    python mutation/run_mutants.py loading interventions
    python mutation/run_mutants.py --rerun loading      # rerun the survivors with the current tests (the existing
                                                        # copy, or a fresh one and the survivors kept in results.json)
    python mutation/run_mutants.py --resume loading     # continue an interrupted run (results are kept per mutant)
    python mutation/run_mutants.py --rev HEAD plan      # mutate the last commit, not the working tree
    python mutation/run_mutants.py --jobs 2 sweep       # two mutants at a time (one per CPU core)
    python mutation/run_mutants.py --report-only        # fold the copies' results into results.json, rebuild REPORT.md

What mutmut 3 mutates: the bodies of top-level functions and methods (numbers, strings, operators, comparisons,
`and`/`or`, True/False/None, call arguments, ...). It does not mutate module-level statements (the rule tables
`RULES` of hookvene/loading/*.py and the component tables of hookvene/components.py are module-level literals), nor
decorated functions other than static/class methods (`@property`, and `hookvene.models.common.generate`, which is
`@torch.no_grad()`). The tables are mutated by tests/test_mutants_tables.py instead (each rule dropped, each pair
of same-shaped rules swapped, each layer index shifted; the parity check must fail on every one).

A survivor listed in mutation/equivalent.md (a line "- `mutant name`: why it is equivalent") is reported as
equivalent; every other survivor is a missing test.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["-m", "not slow and not subprocess", "-p", "no:cacheprovider", "-q", "-x"]

# group -> (files to mutate, test files, mutant-name globs to run or None for every mutant of those files)
GROUPS: dict[str, tuple[list[str], list[str], list[str] | None]] = {
    "loading": (
        ["hookvene/loading/gpt2.py", "hookvene/loading/gpt_neo.py", "hookvene/loading/t5.py",
         "hookvene/loading/gru.py"],
        ["tests/test_loading.py", "tests/test_gpt2.py", "tests/test_gpt_neo.py", "tests/test_t5.py",
         "tests/test_gru.py", "tests/test_parity.py", "tests/test_mutants_loading.py"],
        None,
    ),
    "interventions": (
        ["hookvene/interventions.py"],
        ["tests/test_interventions.py", "tests/test_serialization.py", "tests/test_sae.py",
         "tests/test_mutants_interventions.py"],
        None,
    ),
    "locations": (
        ["hookvene/locations.py"],
        ["tests/test_plan.py", "tests/test_intervenable.py", "tests/test_mutants_locations.py"],
        None,
    ),
    "components": (
        ["hookvene/components.py"],
        ["tests/test_components.py", "tests/test_component_aliases.py", "tests/test_pyvene_compat.py",
         "tests/test_reliability.py", "tests/test_intervenable.py", "tests/test_mutants_components.py"],
        None,
    ),
    "plan": (
        ["hookvene/plan.py"],
        ["tests/test_plan.py", "tests/test_intervenable.py", "tests/test_rare_paths.py", "tests/test_gru.py",
         "tests/test_pyvene_compat.py", "tests/test_spec_101.py", "tests/test_spec_other_models.py",
         "tests/test_generate.py", "tests/test_mutants_plan.py"],
        None,
    ),
    "sweep": (
        ["hookvene/experiments/sweep.py"],
        ["tests/test_experiments.py", "tests/test_trust.py", "tests/test_llama.py", "tests/test_gpt_neox.py",
         "tests/test_sae.py", "tests/test_spec_101.py", "tests/test_mutants_sweep.py"],
        None,
    ),
    "generate": (
        ["hookvene/generate.py", "hookvene/models/common.py"],
        ["tests/test_generate.py", "tests/test_rare_paths.py", "tests/test_mutants_generate.py"],
        # the decoding loop's helpers in models/common.py (`generate` itself is decorated: mutmut skips it)
        ["hookvene.generate.*", "hookvene.models.common.x_new_token_count__mutmut_*",
         "hookvene.models.common.x_pick_next__mutmut_*"],
    ),
}

ALSO_COPY = ["LICENSE", "Makefile", "README.md", "examples", "mutation", "scripts", "benchmarks", ".ci"]
STORE = ROOT / "mutation" / "results.json"  # the kept results (see `collect`)
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


def copy_tree(dest: Path, rev: str | None) -> None:
    """A fresh copy of the code to mutate at dest: the files of git revision `rev`, or (rev None) the working tree's
    tracked and untracked-but-not-ignored files."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in files:
        src = ROOT / f
        if f and src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def revision(rev: str | None) -> str:
    """What a run mutated, for the report: a short commit id, plus "+ local changes" for a dirty working tree."""
    head = subprocess.run(["git", "rev-parse", "--short", rev or "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    if rev is None and subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip():
        head += " + local changes"
    return head


def write_config(work: Path, files: list[str], tests: list[str]) -> None:
    """The copy's pyproject.toml with a [tool.mutmut] section for this group (replacing any there)."""
    pyproject = work / "pyproject.toml"
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", pyproject.read_text())
    tests = [t for t in tests if (work / t).exists()]

    def toml_list(xs: list[str]) -> str:
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"

    text += (f"\n[tool.mutmut]\nsource_paths = [\"hookvene\"]\nonly_mutate = {toml_list(files)}\n"
             f"pytest_add_cli_args = {toml_list(FAST)}\n"
             f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
             f"use_git_change_detection = false\n"
             # files some tests read (the license, the READMEs, the examples), into mutmut's mutants/ copy too
             f"also_copy = {toml_list(ALSO_COPY)}\n")
    pyproject.write_text(text)


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    e.pop("PYTHONPATH", None)
    return e


def mutmut(work: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True)
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=work, env=env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def statuses(work: Path, files: list[str], globs: list[str] | None) -> dict[str, str]:
    """mutant name -> status, read from mutmut's per-file .meta results."""
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415

    out = {}
    for f in files:
        meta = work / "mutants" / (f + ".meta")
        if not meta.exists():
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if globs is None or any(_fnmatch(name, g) for g in globs):
                out[name] = status_by_exit_code[code]
    return out


def results(workdir: Path, group: str) -> dict[str, str]:
    """The group's results: the last full run, overlaid with every later rerun (mutmut's own files keep only the
    mutants of its last run), saved as <workdir>/<group>.results.json."""
    files, _, globs = GROUPS[group]
    path = workdir / f"{group}.results.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for name, status in statuses(workdir / group, files, globs).items():
        if status != "not checked" or name not in out:
            out[name] = status
    return out


def save_results(workdir: Path, group: str, first: bool) -> None:
    merged = results(workdir, group)
    (workdir / f"{group}.results.json").write_text(json.dumps(merged, indent=1))
    if first:  # the suite's own score, before tests written for this group's survivors
        (workdir / f"{group}.before.json").write_text(json.dumps(merged, indent=1))


def _fnmatch(name: str, glob: str) -> bool:
    import fnmatch  # noqa: PLC0415

    return fnmatch.fnmatchcase(name, glob)


DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
out = {}
for name in json.load(sys.stdin):
    try:
        out[name] = get_diff_for_mutant(name)
    except Exception as e:  # a mutant of a file changed since the run
        out[name] = f"(no diff: {e})"
print(json.dumps(out))
"""


def diffs(work: Path, names: list[str]) -> dict[str, str]:
    """mutant name -> its diff, from one process (`mutmut show` per mutant costs a second each)."""
    if not names:
        return {}
    r = subprocess.run([sys.executable, "-c", DIFFS], cwd=work, env=env(), input=json.dumps(names),
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


def run_group(group: str, workdir: Path, rerun: bool, resume: bool = False, rev: str | None = None,
              jobs: int = 1) -> None:
    files, tests, globs = GROUPS[group]
    work = workdir / group
    log = workdir / f"{group}.log"
    start = time.time()

    def run(*names: str) -> None:  # mutmut on the named mutants (or name globs); on all of them when none are named
        mutmut(work, "run", "--max-children", str(jobs), *names, log=log)

    if rerun and not (work / "mutants").exists():  # no copy left (a new machine): the kept survivors, fresh copy
        kept = json.loads(STORE.read_text()) if STORE.exists() else {}
        survivors = sorted(n for f in files for n in kept.get(f, {}).get("survivors", {}))
        if not survivors:
            print(f"[{group}] no kept survivors to rerun")
            return
        copy_tree(work, rev)
        write_config(work, files, tests)
        log.write_text("")
        (workdir / f"{group}.rerun").write_text("\n".join(survivors))
        (workdir / f"{group}.revision").write_text(revision(rev))
        print(f"[{group}] rerunning {len(survivors)} kept survivors in a fresh copy (log: {log})")
        run(*survivors)
        (workdir / f"{group}.results.json").write_text(json.dumps(results(workdir, group), indent=1))
    elif rerun and (work / "mutants").exists():
        survivors = sorted(n for n, s in results(workdir, group).items() if s not in DETECTED)
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests")
        write_config(work, files, tests)
        if (work / "mutants" / "tests").exists():  # mutmut runs the tests from its own copy
            shutil.rmtree(work / "mutants" / "tests")
            shutil.copytree(ROOT / "tests", work / "mutants" / "tests")
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # which tests reach what: measure again
        # The code is the first run's, the tests are the working tree's: the report says both.
        rev_path = workdir / f"{group}.revision"
        first = rev_path.read_text().split(",")[0].strip() if rev_path.exists() else "unknown"
        rev_path.write_text(f"{first}, survivors rerun on {revision(None)}")
        if not survivors:
            print(f"[{group}] no survivors to rerun")
            return
        print(f"[{group}] rerunning {len(survivors)} survivors (log: {log})")
        run(*survivors)
        save_results(workdir, group, first=False)
    elif resume and (work / "mutants").exists():
        print(f"[{group}] continuing the unfinished run in {work} (log: {log})")
        run(*(globs or []))
        save_results(workdir, group, first=True)
    else:
        copy_tree(work, rev)
        (workdir / f"{group}.revision").write_text(revision(rev))
        write_config(work, files, tests)
        log.write_text("")
        print(f"[{group}] mutating {', '.join(files)}; tests {', '.join(tests)} (copy: {work}, log: {log})")
        for f in (workdir / f"{group}.results.json", workdir / f"{group}.before.json"):
            f.unlink(missing_ok=True)
        run(*(globs or []))
        save_results(workdir, group, first=True)
    print(f"[{group}] done in {time.time() - start:.0f} s")


def collect(workdir: Path, store: Path) -> None:
    """Fold the groups found in workdir into `store` (mutation/results.json: per module, the counts and every
    survivor's diff), so the report never depends on /tmp: modules not run this time keep their last results."""
    saved = json.loads(store.read_text()) if store.exists() else {}
    for group, (files, _, _) in GROUPS.items():
        work = workdir / group
        if not (work / "mutants").exists():
            continue
        st = results(workdir, group)
        first_path = workdir / f"{group}.before.json"
        first = json.loads(first_path.read_text()) if first_path.exists() else st
        rev_path = workdir / f"{group}.revision"
        rerun_path = workdir / f"{group}.rerun"
        if rerun_path.exists():  # only the kept survivors ran: those detected now leave the survivor list
            for f in files:
                if f not in saved:
                    continue
                if rev_path.exists():
                    rerun_on = rev_path.read_text().strip()
                    saved[f]["revision"] = f"{saved[f].get('revision', 'unknown')}, survivors rerun on {rerun_on}"
                for n in [n for n in saved[f]["survivors"] if st.get(n) in DETECTED]:
                    was = saved[f]["survivors"].pop(n)["status"]
                    saved[f]["detected"] += 1
                    saved[f]["survived" if was == "survived" else "no_tests"] -= 1
            continue
        for f in files:
            prefix = f.removesuffix(".py").replace("/", ".") + "."
            mine = {n: s for n, s in st.items() if n.startswith(prefix) and s != "not checked"}
            if not mine:
                continue
            old = [s for n, s in first.items() if n.startswith(prefix) and s != "not checked"]
            c = Counter(mine.values())
            alive = sorted(n for n, s in mine.items() if s not in DETECTED)
            shown = diffs(work, alive)
            saved[f] = {"run": len(mine),
                        "before": f"{100 * sum(s in DETECTED for s in old) / len(old):.1f}% ({len(old)} run)"
                        if old else "not run",
                        "detected": sum(c[s] for s in DETECTED), "survived": c["survived"],
                        "no_tests": c["no tests"],
                        "revision": rev_path.read_text().strip() if rev_path.exists() else "unknown",
                        "survivors": {n: {"status": mine[n], "diff": "\n".join(shown[n].splitlines()[2:])}
                                      for n in alive}}  # the diff without its ---/+++ file lines
    store.write_text(json.dumps(saved, indent=1) + "\n")


def equivalence_notes() -> dict[str, str]:
    """mutant name -> why it is equivalent, from mutation/equivalent.md."""
    eq = ROOT / "mutation" / "equivalent.md"
    return {m.group(1): m.group(2) for m in re.finditer(r"^- `([^`]+)`:\s*(.+)$", eq.read_text(), re.M)} \
        if eq.exists() else {}


def readme_table(store: Path = STORE) -> str:
    """The README's kill-rate table, from the kept results (tests/test_readme.py checks the README holds it)."""
    notes, saved = equivalence_notes(), json.loads(store.read_text())
    order = [f for files, _, _ in GROUPS.values() for f in files]
    lines = ["| module | commit | mutants run | kill rate before | kill rate after | after, equivalents excluded | "
             "survivors not explained |", "|---|---|---:|---:|---:|---:|---:|"]
    for f in sorted(saved, key=lambda f: order.index(f) if f in order else len(order)):
        r = saved[f]
        equiv = sum(n in notes for n in r["survivors"])
        lines.append(f"| `{f}` | {r.get('revision', 'unknown')} | {r['run']} | {r['before']} | "
                     f"{100 * r['detected'] / r['run']:.1f}% | "
                     f"{100 * r['detected'] / max(r['run'] - equiv, 1):.1f}% | {len(r['survivors']) - equiv} |")
    return "\n".join(lines)


def report(store: Path, out: Path) -> None:
    notes = equivalence_notes()
    saved = json.loads(store.read_text())
    lines = ["# Mutation testing report (mutmut 3; `make mutants`, see mutation/run_mutants.py)", "",
             "Kill rate = mutants detected (killed, or timed out) / mutants run, per module. *Before*: the suite "
             "without the tests written for survivors (tests/test_mutants_*.py) on the group's first full run; "
             "*after*: with them (survivors rerun). A survivor either is listed in mutation/equivalent.md with the "
             "reason it cannot change a result, or needs a test. *Commit*: the code that was mutated "
             "(results are kept in mutation/results.json).", "",
             "| module | commit | mutants run | kill rate before | detected | survived | no test ran | "
             "equivalent (noted) | kill rate | kill rate, equivalents excluded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    order = [f for files, _, _ in GROUPS.values() for f in files]
    for f in sorted(saved, key=lambda f: order.index(f) if f in order else len(order)):
        r = saved[f]
        equiv = [n for n in r["survivors"] if n in notes]
        rate = r["detected"] / r["run"]
        rate_eq = r["detected"] / max(r["run"] - len(equiv), 1)
        lines.append(f"| {f} | {r.get('revision', 'unknown')} | {r['run']} | {r['before']} | {r['detected']} | "
                     f"{r['survived']} | {r['no_tests']} | {len(equiv)} | {100 * rate:.1f}% | {100 * rate_eq:.1f}% |")
        for n, s in r["survivors"].items():
            why = f"equivalent: {notes[n]}" if n in notes else "NOT EXPLAINED (needs a test or a note)"
            details += [f"### `{n}` ({s['status']}; {why})", "", "```diff", s["diff"], "```", ""]
    lines += ["", "## Surviving mutants", ""] + (details or ["None."])
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all): {', '.join(GROUPS)}")
    ap.add_argument("--workdir", default="/tmp/hookvene-mutants", type=Path)
    ap.add_argument("--rerun", action="store_true", help="rerun only the survivors, with the current tests")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in the existing copy")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--report", default=ROOT / "mutation" / "REPORT.md", type=Path)
    ap.add_argument("--results", default=STORE, type=Path,
                    help="the kept results, one entry per module (updated from --workdir, then rendered)")
    ap.add_argument("--rev", help="mutate this git revision (e.g. HEAD) instead of the working tree")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}; groups: {', '.join(GROUPS)}")
    if not args.report_only:
        for group in args.groups or GROUPS:
            run_group(group, args.workdir, args.rerun, args.resume, args.rev, args.jobs)
    collect(args.workdir, args.results)
    report(args.results, args.report)


if __name__ == "__main__":
    main()
