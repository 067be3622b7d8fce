"""Every bad input to samfast-train and samfast-reproduce ends in one line,
``PROG: error: ...`` naming the problem, exit status 2 and no traceback; and a run directory
is never overwritten or mixed: refused, resumed only with the same settings and data,
replaced only when asked, forked only from a run trained identically.

The CLIs run in-process (``main(argv)``) on tiny data; a subprocess only where the process
itself matters (SIGKILL, the real entry point)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samfast import reproduce
from samfast.cifar import train as trainer
from samfast.cifar.demo import DEMO_DATA

ROOT = Path(__file__).resolve().parent.parent


def tiny(out, *extra, data=DEMO_DATA):
    return ["--data-dir", str(data), "--train-subset", "100", "--test-subset", "50",
            "--batch-size", "50", "--epochs", "2", "--optimizer", "sgd", "--quiet",
            "--device", "cpu", "--out", str(out), *extra]


def call(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a CLI's main, run in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit for a bad flag
        code = exc.code
    return code, capsys.readouterr().err


def assert_error(code, err, *needles, prog="samfast-train", usage=False):
    """Exit 2, no traceback, and the error as one line naming ``needles`` (after argparse's
    usage lines for a bad flag)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if not usage:
        assert len(lines) == 1, err
    assert lines[-1].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in lines[-1], err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch SGD run that kept its state at the start of epoch 1."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert trainer.main(tiny(out, "--snapshot-epochs", "1")) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# -- data ------------------------------------------------------------------------------------

def _write_data(root: Path, n_train=20, n_test=10, compressed=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save = np.savez_compressed if compressed else np.savez
    for name, n in (("train_0", n_train), ("test", n_test)):
        save(root / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=np.arange(n) % 10)
    return root


def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    elif kind in ("damaged", "damaged_stored"):
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    elif kind == "not_a_zip":
        path.write_bytes(b"not a zip archive at all")
    elif kind == "lacks_y":
        np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8))
    elif kind == "pickled":
        np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))


@pytest.mark.parametrize("kind", ["truncated", "damaged", "damaged_stored", "not_a_zip",
                                  "lacks_y", "pickled"])
def test_unreadable_npz(kind, tmp_path, capsys):
    data = _write_data(tmp_path / "data", compressed=kind != "damaged_stored")
    _damage(data / "train_0.npz", kind)
    code, err = call(trainer.main, tiny(tmp_path / "out", data=data), capsys)
    assert_error(code, err, "train_0.npz", "not a readable .npz")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("missing", ["directory", "test.npz"])
def test_missing_data(missing, tmp_path, capsys):
    data = _write_data(tmp_path / "data")
    if missing == "directory":
        data = tmp_path / "nowhere"
    else:
        (data / "test.npz").unlink()
    code, err = call(trainer.main, tiny(tmp_path / "out", data=data), capsys)
    assert_error(code, err, "no cifar10 data", str(data))


@pytest.mark.parametrize("split", ["training", "test"])
def test_an_empty_split(split, tmp_path, capsys):
    data = _write_data(tmp_path / "data", **({"n_train": 0} if split == "training"
                                            else {"n_test": 0}))
    code, err = call(trainer.main, tiny(tmp_path / "out", data=data), capsys)
    assert_error(code, err, f"no {split} images")


def test_a_subset_larger_than_the_data(tmp_path, capsys):
    data = _write_data(tmp_path / "data")  # 20 training images; tiny() asks for 100
    code, err = call(trainer.main, tiny(tmp_path / "out", data=data), capsys)
    assert_error(code, err, "--train-subset 100 > 20 images")


def test_a_subset_of_zero_images_is_a_bad_flag(tmp_path, capsys):
    code, err = call(trainer.main, tiny(tmp_path / "out", "--train-subset", "0"), capsys)
    assert_error(code, err, "argument --train-subset", usage=True)


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    data = _write_data(tmp_path / "data")
    _damage(data / "train_0.npz", "truncated")
    proc = subprocess.run([sys.executable, "-m", "samfast.cifar.train",
                           *tiny(tmp_path / "out", data=data)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert_error(proc.returncode, proc.stderr, "train_0.npz")


# -- checkpoints -----------------------------------------------------------------------------

def _good_checkpoint(finished: Path) -> dict:
    return torch.load(finished / "last.pt", weights_only=True)


@pytest.mark.parametrize("kind, needle", [
    ("garbage", "not a complete torch.save archive"),
    ("truncated", "not a complete torch.save archive"),
    ("damaged_pickle", "not a readable checkpoint"),
    ("plain_dict", "missing format, optimizer"),
    ("tensor", "not a samfast-train checkpoint (a Tensor)"),
    ("older_format", "older samfast-train"),
    ("other_model", "does not fit this run's model"),
])
def test_an_unusable_last_pt(kind, needle, run_copy, finished, capsys):
    path = run_copy / "last.pt"
    raw = path.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "damaged_pickle":  # the pickle is the archive's first member
        path.write_bytes(raw[:200] + bytes(b ^ 0x5A for b in raw[200:204]) + raw[204:])
    elif kind == "plain_dict":
        torch.save({"model": {}}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "older_format":
        ckpt = _good_checkpoint(finished)
        torch.save({**{k: v for k, v in ckpt.items() if k not in ("data", "world_size")},
                    "format": 1}, path)
    elif kind == "other_model":
        torch.save({**_good_checkpoint(finished), "model": {"w": torch.zeros(1)}}, path)
    code, err = call(trainer.main, tiny(run_copy, "--resume"), capsys)
    assert_error(code, err, str(path), needle)


# -- the run directory -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_an_unwritable_out(where, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if where == "under_a_file" else tmp_path / "file"
    code, err = call(trainer.main, tiny(out), capsys)
    assert_error(code, err, "argument --out", str(out))


def test_an_existing_run_is_neither_overwritten_nor_continued_unasked(run_copy, capsys):
    before = (run_copy / "metrics.jsonl").read_text()
    code, err = call(trainer.main, tiny(run_copy), capsys)
    assert_error(code, err, str(run_copy), "already holds a run", "last.pt", "--resume",
                 "--overwrite")
    assert (run_copy / "metrics.jsonl").read_text() == before


def test_resume_and_overwrite_together(run_copy, capsys):
    code, err = call(trainer.main, tiny(run_copy, "--resume", "--overwrite"), capsys)
    assert_error(code, err, "argument --overwrite", "--resume", usage=True)


def test_resume_of_a_finished_run_without_its_checkpoint(run_copy, capsys):
    (run_copy / "last.pt").unlink()
    code, err = call(trainer.main, tiny(run_copy, "--resume"), capsys)
    assert_error(code, err, "summary.json", "no last.pt", "--overwrite")
    assert (run_copy / "summary.json").exists()


@pytest.mark.parametrize("flags, change", [
    (["--lr", "0.2"], "--lr 0.1 -> 0.2"),
    (["--model", "resnet20"], "--model small_cnn -> resnet20"),
    (["--backend", "reference"], "--backend auto -> reference"),
    (["--test-subset", "30"], "--test-subset 50 -> 30"),
    (["--augment", "none"], "--augment crop_flip -> none"),
    (["--optimizer", "sam"], "--optimizer sgd -> sam"),
    (["--seed", "1"], "--seed 0 -> 1"),
])
def test_resume_refuses_a_changed_setting(flags, change, run_copy, capsys):
    before = (run_copy / "metrics.jsonl").read_text()
    code, err = call(trainer.main, tiny(run_copy, "--resume", *flags), capsys)
    assert_error(code, err, "--resume", "other settings", change)
    assert (run_copy / "metrics.jsonl").read_text() == before


def test_resume_refuses_other_data_and_accepts_a_copy_of_the_same(run_copy, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(DEMO_DATA, copy)
    code, err = call(trainer.main, tiny(run_copy, "--resume", "--lr", "0.3", data=copy), capsys)
    assert_error(code, err, "--lr 0.1 -> 0.3")
    assert "the data used" not in err  # the same arrays under another path: the same data
    assert call(trainer.main, tiny(run_copy, "--resume", data=copy), capsys)[0] == 0
    with np.load(copy / "train_0.npz") as f:
        x, y = f["x"] ^ 1, f["y"]
    np.savez_compressed(copy / "train_0.npz", x=x, y=y)
    code, err = call(trainer.main, tiny(run_copy, "--resume", data=copy), capsys)
    assert_error(code, err, "the data used", f"--data-dir {DEMO_DATA} -> {copy}", "train ")


def test_overwrite_replaces_every_output_of_the_old_run(run_copy, capsys):
    assert (run_copy / "epoch_1.pt").exists()
    assert call(trainer.main, tiny(run_copy, "--overwrite", "--epochs", "1"), capsys)[0] == 0
    assert not (run_copy / "epoch_1.pt").exists()
    rows = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0]
    assert json.loads((run_copy / "summary.json").read_text())["config"]["epochs"] == 1


def test_resume_without_a_checkpoint_starts_afresh_in_a_clean_directory(run_copy, capsys):
    (run_copy / "last.pt").unlink()
    (run_copy / "summary.json").unlink()
    (run_copy / "metrics.jsonl").write_text('{"epoch": 0, "from": "another run"}\n' * 5)
    code, err = call(trainer.main, tiny(run_copy, "--resume"), capsys)
    assert code == 0 and "starting from scratch" in err
    rows = [json.loads(r) for r in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all("from" not in r for r in rows)


_STALLED_CHECKPOINT = """
import sys, time
from samfast.cifar import train

def stalled(path, state):
    def write(f):
        f.write(b"half a checkpoint")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(600)
    train.atomic_write_bytes(path, write)

train.save_checkpoint = stalled
sys.exit(train.main(sys.argv[1:]))
"""


def test_temporary_files_of_a_checkpoint_killed_half_way_are_cleaned(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_CHECKPOINT, *tiny(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    orphans = [p.name for p in out.iterdir() if p.name.startswith(".last.pt.")]
    assert len(orphans) == 1 and not (out / "last.pt").exists()
    (out / ".notes.txt").write_text("the user's")  # not ours: stays
    assert call(trainer.main, tiny(out, "--resume"), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt", "curves.png", "last.pt",
                                                     "metrics.jsonl", "summary.json"]


def test_outputs_get_the_users_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert call(trainer.main, tiny(tmp_path / "run", "--epochs", "1"), capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("last.pt", "metrics.jsonl", "summary.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o640, name


# -- forks and snapshots ---------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--fork-from", "{tmp}/nowhere", "--fork-epoch", "1"], "argument --fork-from: no such"),
    (["--fork-from", "{src}"], "argument --fork-epoch: needed"),
    (["--fork-from", "{tmp}", "--fork-epoch", "1"], "argument --fork-from: no epoch_1.pt in"),
    (["--fork-epoch", "1"], "argument --fork-epoch: needs --fork-from"),
    (["--snapshot-epochs", "2"], "argument --snapshot-epochs: each must be in 1..1"),
    (["--snapshot-epochs", "1,x"], "argument --snapshot-epochs"),
])
def test_bad_fork_and_snapshot_flags(flags, needle, finished, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path, src=finished) for f in flags]
    code, err = call(trainer.main, tiny(tmp_path / "out", *flags), capsys)
    assert_error(code, err, needle, usage=True)


@pytest.mark.parametrize("flags, needle", [
    (["--optimizer", "sam"], "epoch 0 is sgd in the source, sam here"),
    (["--lr", "0.2"], "--lr 0.1 -> 0.2"),
    (["--epochs", "3", "--fork-epoch", "2"], "is the state at epoch 1, not 2"),
])
def test_a_fork_from_a_run_trained_otherwise_is_refused(flags, needle, finished, tmp_path,
                                                         capsys):
    argv = tiny(tmp_path / "out", "--fork-from", str(finished / "epoch_1.pt"), *flags)
    code, err = call(trainer.main, argv, capsys)
    assert_error(code, err, "--fork-from", needle)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_fork_from_a_damaged_snapshot_is_refused(finished, tmp_path, capsys):
    (tmp_path / "epoch_1.pt").write_bytes((finished / "epoch_1.pt").read_bytes()[:1000])
    code, err = call(trainer.main, tiny(tmp_path / "out", "--fork-from",
                                        str(tmp_path / "epoch_1.pt")), capsys)
    assert_error(code, err, "epoch_1.pt", "not a complete torch.save archive")


def test_a_snapshot_the_resumed_run_has_passed(run_copy, capsys):
    (run_copy / "epoch_1.pt").unlink()
    code, err = call(trainer.main, tiny(run_copy, "--resume", "--snapshot-epochs", "1"), capsys)
    assert_error(code, err, "argument --snapshot-epochs", "no epoch_1.pt")


# -- samfast-reproduce -----------------------------------------------------------------------

def _one_epoch_smoke(mp: pytest.MonkeyPatch) -> None:
    """The smoke scale cut to 1 epoch, without sharpness: seconds per run."""
    for key, value in (("epochs", 1), ("late_switch_epoch", 1), ("sharpness_every", 0)):
        mp.setitem(reproduce.SETTINGS["smoke"], key, (value, "test"))


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        _one_epoch_smoke(mp)
        assert reproduce.main(["late_switch", "--scale", "smoke", "--device", "cpu",
                               "--out", str(out)]) == 0
    return out


@pytest.fixture
def grid_copy(grid, tmp_path, monkeypatch) -> Path:
    _one_epoch_smoke(monkeypatch)
    shutil.copytree(grid, tmp_path / "grid")
    return tmp_path / "grid"


def smoke(out, *extra):
    return ["late_switch", "--scale", "smoke", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("flags, needle", [
    (["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["--seeds", "-2"], "argument --seeds: must be >= 1, got -2"),
    (["--torchrun", "0"], "argument --torchrun: must be >= 1"),
    (["--estimate", "--sgd-epoch-seconds", "-1"], "argument --sgd-epoch-seconds"),
])
def test_reproduce_bad_flags(flags, needle, tmp_path, capsys):
    code, err = call(reproduce.main, smoke(tmp_path, *flags), capsys)
    assert_error(code, err, needle, prog="samfast-reproduce", usage=True)
    assert not any(tmp_path.iterdir())


def test_reproduce_bad_device(tmp_path, capsys):
    bad = "cuda:7" if not torch.cuda.is_available() else "tpu"
    argv = ["late_switch", "--scale", "smoke", "--device", bad, "--out", str(tmp_path)]
    code, err = call(reproduce.main, argv, capsys)
    assert_error(code, err, "argument --device", prog="samfast-reproduce")


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_reproduce_on_a_bad_data_dir(kind, tmp_path, capsys):
    data = tmp_path / "nowhere"
    if kind == "truncated":
        data = _write_data(tmp_path / "data")
        _damage(data / "train_0.npz", "truncated")
    code, err = call(reproduce.main, smoke(tmp_path / "out", "--data-dir", str(data)), capsys)
    assert_error(code, err, str(data), prog="samfast-reproduce")
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_to_report_runs_of_other_data(grid_copy, tmp_path, capsys):
    root = grid_copy / "smoke" / "late_switch"
    copy = tmp_path / "data"
    shutil.copytree(DEMO_DATA, copy)
    assert call(reproduce.main, smoke(grid_copy, "--data-dir", str(copy)), capsys)[1].count(
        "skip") == 3  # the same data elsewhere: the same runs
    before = {name: (root / name).read_text() for name in ("results.md", "settings.json")}
    with np.load(copy / "train_0.npz") as f:
        x, y = f["x"] ^ 1, f["y"]
    np.savez_compressed(copy / "train_0.npz", x=x, y=y)
    code, err = call(reproduce.main, smoke(grid_copy, "--data-dir", str(copy)), capsys)
    assert_error(code, err, "3 run directories", "another configuration", "--data-dir",
                 "the data used", prog="samfast-reproduce")
    assert {name: (root / name).read_text() for name in before} == before


def test_reproduce_refuses_an_interrupted_run_of_other_settings(grid_copy, capsys):
    seed0 = grid_copy / "smoke" / "late_switch" / "SGD" / "seed0"
    ckpt = torch.load(seed0 / "last.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "lr": 0.5}}, seed0 / "last.pt")
    (seed0 / "summary.json").unlink()
    code, err = call(reproduce.main, smoke(grid_copy), capsys)
    assert_error(code, err, "1 run directory", str(seed0), "--lr 0.5 -> 0.1",
                 prog="samfast-reproduce")


def test_reproduce_says_it_resumes_an_interrupted_run(grid_copy, capsys):
    seed0 = grid_copy / "smoke" / "late_switch" / "SGD" / "seed0"
    summary = json.loads((seed0 / "summary.json").read_text())
    (seed0 / "summary.json").unlink()
    code, err = call(reproduce.main, smoke(grid_copy), capsys)
    assert code == 0 and "run  SGD seed 0 (resuming its interrupted run)" in err, err
    assert "from scratch" not in err and err.count("skip") == 2
    assert f"resuming {seed0 / 'last.pt'} at epoch" in err, err  # the trainer did resume
    assert json.loads((seed0 / "summary.json").read_text())["test_acc"] == summary["test_acc"]


def test_reproduce_on_a_damaged_summary(grid_copy, capsys):
    summary = grid_copy / "smoke" / "late_switch" / "SAM" / "seed0" / "summary.json"
    summary.write_text('{"test_acc": ')
    code, err = call(reproduce.main, smoke(grid_copy), capsys)
    assert_error(code, err, str(summary), "not a readable samfast-train summary",
                 prog="samfast-reproduce")
