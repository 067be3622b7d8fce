"""bench/gpu_check.sh's Python side: the import proof and the report.

    gpu_check_report.py build  --site DIR --route R --device D   # where samfast came from
    gpu_check_report.py load-build --src DIR --site DIR --build-dir DIR  # last build step
    gpu_check_report.py finish --res DIR --top DIR --device D    # results files + summary

``build`` prints ``samfast.__file__``, ``samfast._C.build_info()`` and the backends per device,
writes ``build-<device>-<date>.{md,json}`` and exits 3 if samfast or samfast._C was not
imported from under ``--site`` (the tree's sources or an editable install would have been
measured instead).

``finish`` turns the pytest junit XML (or, if pytest was killed before writing it, its -v log)
and the doctor's JSON into ``tests-*`` and ``doctor-*`` results files in the committed format
of bench/results (markdown + JSON with the environment), then writes ``summary.md`` and
``summary.json`` into ``--top``: every section's status and time, the test counts, and the
headline numbers of each benchmark found in ``--res``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available to torch: the environment is recorded for the CPU")
        return torch.device("cpu")
    return torch.device(name)


# -- build -------------------------------------------------------------------------------------

def build(args) -> int:
    import samfast
    from samfast.doctor import extension
    site = Path(args.site).resolve()
    where = Path(samfast.__file__).resolve()
    print(f"samfast imported from: {samfast.__file__}")
    info = {"samfast_file": str(where), "site": str(site), "route": args.route,
            "from_site": site in where.parents, "extension": extension()}
    try:
        from samfast import _C
        info["C_file"] = _C.__file__
        info["from_site"] &= site in Path(_C.__file__).resolve().parents
        print(f"samfast._C: {_C.__file__}")
        print(f"samfast._C.build_info(): {_C.build_info()}")
    except ImportError as exc:  # the JIT route registers the ops without the module
        print(f"samfast._C: not importable ({exc}); extension: {info['extension']}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {d: samfast.available_backends(d) for d in devices}
    for d, names in info["backends"].items():
        print(f"backends on {d}: {names}")
    text = markdown_table(["", ""], [[k, f"`{v}`"] for k, v in info.items()])
    write_results("build", environment(device_of(args.device)), text, info, None)
    if not info["from_site"]:
        print(f"WRONG IMPORT: samfast ({where}) or samfast._C ({info.get('C_file')}) is not "
              f"from the install in {site}")
        return 3
    return 0


def load_build(args) -> int:
    """samfast._C built by torch.utils.cpp_extension.load (ninja, no setuptools, no pyproject
    metadata) from the sources in ``--src``, with setup.py's flags, and copied into
    ``--site``/samfast: the build chain's last step."""
    import glob
    import os
    import shutil

    from torch.utils import cpp_extension
    src = Path(args.src)
    sources = sorted(glob.glob(f"{src}/csrc/*.cpp")) + sorted(glob.glob(f"{src}/csrc/cpu/*.cpp"))
    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and os.environ.get("SAMFAST_NO_CUDA") != "1")
    if use_cuda:
        sources += sorted(glob.glob(f"{src}/csrc/cuda/*.cu"))
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:  # the flags of setup.py (which says why each is there)
        cpp_extension.load(
            "_C", sources, build_directory=str(build_dir), verbose=True, is_python_module=False,
            extra_cflags=["-O3", "-fopenmp", "-fno-wrapv", "-ffp-contract=off",
                          "-fno-tree-loop-distribute-patterns"],
            extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", "-fmad=false"])
    except Exception as exc:  # noqa: BLE001 - loading it here (without samfast) may fail
        print(f"cpp_extension.load: {type(exc).__name__}: {exc}")
    built = build_dir / "_C.so"
    if not built.exists():
        print(f"no {built}: the build failed")
        return 1
    shutil.copy2(built, Path(args.site) / "samfast" / "_C.so")
    print(f"built {built} (CUDA kernels: {use_cuda}); copied to {args.site}/samfast/_C.so")
    return 0


# -- tests -------------------------------------------------------------------------------------

def tests_from_junit(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                message = (child.get("message") or child.text or "").strip().splitlines()
                message = message[0][:300] if message else ""
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        cases.append({"test": name, "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    return cases


def tests_from_log(path: Path) -> list[dict]:
    """pytest -v lines, what a killed run printed: ``tests/x.py::test_y[a] PASSED [ 5%]``, or
    with pytest-xdist ``[gw1] [ 5%] PASSED tests/x.py::test_y[a]``."""
    words = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
    serial = re.compile(rf"^(\S+::\S+) ({words})\b")
    xdist = re.compile(rf"^\[gw\d+\].*?\b({words}) (\S+::\S+)")
    cases = {}
    for line in path.read_text(errors="replace").splitlines():
        m = serial.match(line)
        test, word = (m[1], m[2]) if m else (None, None)
        if not m and (m := xdist.match(line)):
            test, word = m[2], m[1]
        if test:
            outcome = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(word, word.lower())
            cases[test] = {"test": test, "outcome": outcome, "seconds": None, "message": ""}
    return list(cases.values())


def tests_report(res: Path, env: dict) -> dict | None:
    junit, log = res / "tests-junit.xml", res / "logs" / "tests.log"
    if junit.exists():
        cases, source = tests_from_junit(junit), "junit XML"
    elif log.exists():
        cases, source = tests_from_log(log), "the -v log (no junit XML: pytest did not finish)"
    else:
        return None
    counts = {o: sum(c["outcome"] == o for c in cases) for o in OUTCOMES}
    bad = [c for c in cases if c["outcome"] in ("failed", "error")]
    skipped = {}
    for c in cases:
        if c["outcome"] == "skipped":
            skipped[c["message"]] = skipped.get(c["message"], 0) + 1
    text = (f"From {source}. " + ", ".join(f"{n} {o}" for o, n in counts.items() if n) + "\n\n")
    if bad:
        text += "Failed:\n\n" + markdown_table(
            ["test", "outcome", "message"],
            [[c["test"], c["outcome"], c["message"].replace("|", "/")] for c in bad]) + "\n\n"
    if skipped:
        text += "Skipped:\n\n" + markdown_table(["reason", "tests"],
                                                [[k.replace("|", "/"), v]
                                                 for k, v in skipped.items()]) + "\n"
    write_results("tests", env, text, {"source": source, "counts": counts, "tests": cases}, res)
    return {"counts": counts, "failed": [c["test"] for c in bad], "source": source}


def doctor_report(res: Path, env: dict) -> dict | None:
    path, log = res / "doctor-report.json", res / "logs" / "doctor.log"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    output = log.read_text(errors="replace") if log.exists() else ""
    text = f"`python -m samfast --json` (samfast-doctor):\n\n```\n{output.strip()}\n```\n"
    write_results("doctor", env, text, report, res)
    path.unlink()  # its content is the JSON results file now
    return {"ok": report.get("ok"),
            "backends": {d: sorted(v["backends"]) for d, v in report["devices"].items()}}


# -- benchmark headlines -------------------------------------------------------------------------

def _med(xs) -> float:
    return statistics.median(xs)


def headline(stem: str, data: dict) -> list[str]:
    raw = data["raw"]
    lines = []
    if stem.startswith("optimizer_step"):
        for model, summary in raw.items():
            if not model.endswith("/summary"):
                continue
            for name, row in summary.items():
                if name.startswith("samfast[") and "reference" not in name:
                    lines.append(f"{model[:-8]} {name}: {row['median_ms']:.3f} ms, "
                                 f"{row['x_loop']:.2f}x faster than the loop, "
                                 f"{row['x_sgd']:.2f}x a fused SGD step, {row['gbps']:.1f} GB/s "
                                 f"({row['of_copy']:.0%} of copy)")
    elif stem.startswith("train_step"):
        for model, samples in raw.items():
            if "/" in model:
                continue
            sgd = {"eager": _med(samples["SGD"]),
                   "graph": _med(samples["SGD, CUDA graph"])
                   if "SGD, CUDA graph" in samples else None}
            for name, s in samples.items():
                mode = "graph" if name.endswith(", CUDA graph") else "eager"
                if name.startswith("samfast SAM") and sgd[mode]:
                    lines.append(f"{model} {name}: {_med(s) * 1e3:.2f} ms, "
                                 f"SAM/SGD {_med(s) / sgd[mode]:.3f}")
    elif stem == "grad_path":
        for name, row in raw["summary"].items():
            low, high = row["interval"]
            lines.append(f"{name}: x SGD two passes {row['median_ratio_to_sgd']:.3f} "
                         f"[{low:.3f}, {high:.3f}], {row['median_ms']:.2f} ms")
    elif stem == "pgd":
        for model, s in raw.items():
            lines.append(f"{model}: PGD / train passes {_med(s['PGD']) / _med(s['train']):.3f}")
    elif stem.startswith("sharpness"):
        t = {k: _med(v) for k, v in raw["times_s"].items()}
        fb = t["forward+backward"]
        lines.append(f"HVP / forward+backward {t['HVP (samfast default)'] / fb:.2f} (plain "
                     f"double backward {t['HVP, plain double backward'] / fb:.2f})")
    elif stem == "ddp_sanity":
        bad = [k for k, c in raw["cases"].items() if not c.get("close")]
        lines.append(f"{data['env'].get('process_group')} world {data['env'].get('world_size')}: "
                     f"collectives {'ok' if not raw['collectives_problems'] else 'FAILED'}, "
                     f"{len(raw['cases']) - len(bad)}/{len(raw['cases'])} DDP cases match")
    return lines


def results_stem(path: Path) -> str:
    """``optimizer_step_bf16-cuda-2026-12-02.json`` -> ``optimizer_step_bf16``."""
    return re.sub(r"-(cpu|cuda)-\d{4}-\d\d-\d\d$", "", path.stem)


# -- finish ------------------------------------------------------------------------------------

def finish(args) -> int:
    res, top = Path(args.res), Path(args.top)
    env = environment(device_of(args.device))
    summary = {"env": env, "sections": [], "tests": None, "doctor": None, "build": None,
               "headlines": {}, "files": []}
    sections = res / "sections.tsv"
    if sections.exists():
        for line in sections.read_text().splitlines():
            name, status, seconds, budget = line.split("\t")
            summary["sections"].append({"name": name, "status": status,
                                        "seconds": int(seconds), "budget_s": int(budget)})
    for key, fn in (("tests", tests_report), ("doctor", doctor_report)):
        try:
            summary[key] = fn(res, env)
        except Exception as exc:  # noqa: BLE001 - the summary must still be written
            summary[key] = {"error": f"{type(exc).__name__}: {exc}"}
    for path in sorted(res.glob("*.json")):
        stem = results_stem(path)
        try:
            data = json.loads(path.read_text())
            if stem == "build":
                summary["build"] = data["raw"]
                continue
            if stem in ("tests", "doctor"):
                continue
            summary["headlines"][stem] = headline(stem, data)
        except Exception as exc:  # noqa: BLE001
            summary["headlines"][stem] = [f"(not summarized: {type(exc).__name__}: {exc})"]
    summary["files"] = sorted(str(p.relative_to(res)) for p in res.rglob("*") if p.is_file())
    (top / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (top / "summary.md").write_text(summary_markdown(summary))
    print((top / "summary.md").read_text())
    return 0


def summary_markdown(s: dict) -> str:
    env, build = s["env"], s["build"] or {}
    out = [f"# samfast gpu_check: {env['device']}", "",
           f"- {env['date']}; torch {env['torch']} (CUDA {env.get('torch_cuda')}), triton "
           f"{env['triton']}, python {env['python']}",
           f"- commit {env['commit']}, clean tree {env['clean_tree']}, source fingerprint "
           f"{env.get('tree_fingerprint')}",
           f"- samfast from {build.get('samfast_file')} (built by: {build.get('route')}); "
           f"extension {build.get('extension')}", "",
           "## Sections", "",
           markdown_table(["section", "status", "s", "budget s"],
                          [[x["name"], x["status"], x["seconds"], x["budget_s"]]
                           for x in s["sections"]]), ""]
    tests = s["tests"] or {}
    if "counts" in tests:
        out += ["## Tests", "", ", ".join(f"{n} {o}" for o, n in tests["counts"].items() if n)
                + f" ({tests['source']})", ""]
        out += [f"- FAILED {t}" for t in tests["failed"]] + ([""] if tests["failed"] else [])
    elif tests:
        out += ["## Tests", "", f"no report: {tests}", ""]
    if s["doctor"]:
        out += ["## Doctor", "", f"{s['doctor']}", ""]
    out += ["## Benchmarks", ""]
    for stem, lines in s["headlines"].items():
        out += [f"**{stem}**", ""] + [f"- {line}" for line in lines] + [""]
    out += ["## Files in results.tar.gz", "", ", ".join(s["files"]), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--site", required=True)
    b.add_argument("--route", required=True)
    b.add_argument("--device", default="cuda")
    lb = sub.add_parser("load-build")
    lb.add_argument("--src", required=True)
    lb.add_argument("--site", required=True)
    lb.add_argument("--build-dir", required=True)
    f = sub.add_parser("finish")
    f.add_argument("--res", required=True)
    f.add_argument("--top", required=True)
    f.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    return {"build": build, "load-build": load_build, "finish": finish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
