"""bench/gpu_check.sh's CPU dry run, the way the script will run on a lent GPU.

The device tool sends a copy of the working tree (tracked and untracked-not-ignored files: no
.venv, no build products, no .git) plus the carried .whl/, and runs the script with python3's
preinstalled torch, in which samfast is NOT installed. Here the copy is made the same way
(``git ls-files --cached --others --exclude-standard``); this interpreter plays python3 (its
own editable samfast must not be what gets imported: the script's non-editable install into a
scratch target dir, PYTHONPATH and scratch cwd must be). Asserted: exit status 0, every section
ran and passed, samfast was imported from the target dir by every entry point, the tree copy
was left as it was, $OUT holds at most 8 files at most 2 folders down, and every results file
is well-formed. ~2-3 minutes on 2 CPU cores, most of it the CPU extension build and Python
start-ups; test_kernels.py is left out of the dry run's test section (the suite runs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["build", "import-check", "tests", "doctor", "optimizer-step-fp32",
            "optimizer-step-bf16", "train-step", "grad-path", "pgd", "hvp", "ddp-gloo"]
RESULTS = ["build", "tests", "doctor", "optimizer_step", "optimizer_step_bf16",
           "train_step-bf16", "grad_path", "pgd", "sharpness-small_cnn", "ddp_sanity"]
ENV_KEYS = {"device", "device_type", "torch", "triton", "python", "commit", "clean_tree",
            "tree_fingerprint", "date"}
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def copy_like_the_device_tool(dest: Path) -> None:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the device tool's copy cannot be reproduced")
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree does not travel
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # carry=[".whl"]: the wheels travel; the provenance stamp is this test's own
    (dest / ".whl").mkdir()
    for wheel in (ROOT / ".whl").glob("*.whl"):
        shutil.copy2(wheel, dest / ".whl")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and timeout")
def test_dry_run_from_a_copy_of_the_tree(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    copy_like_the_device_tool(tree)
    script = ["bash", str(tree / "bench" / "gpu_check.sh")]
    fingerprint = subprocess.run([*script, "--fingerprint"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    (tree / ".whl" / "STAMP").write_text(
        f"commit=stamped0\nclean_tree=1\nfingerprint={fingerprint}\n")
    before = files_under(tree)
    # as on the device: nothing of this session's set-up (conftest.py's TRITON_INTERPRET too)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "OUT", "TRITON_INTERPRET")
           and not k.startswith(("SAMFAST_", "GPU_CHECK_"))}
    env.update(DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path),
               GPU_CHECK_TESTS="tests/test_cuda.py tests/test_doctor.py")
    proc = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "every section ok" in log

    # samfast came from the scratch target dir, in the import check and in every benchmark
    scratch = re.search(r"scratch (\S+);", log)[1]
    site = f"{scratch}/site/"
    assert f"samfast imported from: {site}samfast/__init__.py" in log, log[-6000:]
    assert f"samfast._C: {site}samfast/_C" in log
    assert files_under(tree) == before, "the run wrote into the tree"
    assert not Path(scratch).exists(), "the scratch dir is left behind"

    # $OUT: what the device tool brings back
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["raw.log", "results.tar.gz", "summary.json",
                                             "summary.md"]
    assert all(len(p.relative_to(out).parts) <= 3 and NAME.match(p.name) for p in files)
    assert sum(p.stat().st_size for p in files) < 4 << 20

    summary = json.loads((out / "summary.json").read_text())
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == SECTIONS
    assert all(s["status"].startswith("ok") for s in sections.values()), sections
    assert summary["tests"]["counts"]["failed"] == summary["tests"]["counts"]["error"] == 0
    assert summary["tests"]["counts"]["passed"] > 0
    assert summary["env"]["commit"] == "stamped0" and summary["env"]["clean_tree"] is True
    assert summary["env"]["tree_fingerprint"] == fingerprint
    assert summary["build"]["route"] == "pip" and summary["build"]["from_site"]

    with tarfile.open(out / "results.tar.gz") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        for stem in RESULTS:
            names = [n for n in members if re.fullmatch(rf"{re.escape(stem)}-cpu-[\d-]+\.md",
                                                         n)]
            assert len(names) == 1, (stem, sorted(members))
            data = json.load(tar.extractfile(members[names[0][:-3] + ".json"]))
            assert ENV_KEYS <= set(data["env"]) and "raw" in data, stem
            assert data["env"]["commit"] == "stamped0", stem
            assert data["env"]["samfast_file"].startswith(site), (stem, data["env"])
        for name in ("tests-junit.xml", "sections.tsv", "logs/build-1-pip.log",
                     "logs/tests.log"):
            assert name in members
