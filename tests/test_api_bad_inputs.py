"""Regression tests for the library API's handling of its inputs (issue #15): the single-batch
form of ``data``, L2 PGD without a radius, integer-like and bad numbers, unconverged
eigenvalues, samfast-sharpness on bad checkpoints and flags, and what ``import samfast``
pulls in."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import samfast
from samfast.cifar import sharpness_cli
from samfast.cifar.demo import DEMO_DATA
from samfast.cifar.models import build_model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def images(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 2, 2, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# ----------------------------------------------------------------------------------------
# data: one (inputs, targets) batch or an iterable of them
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 6], ids=["two-samples", "six-samples"])
def test_one_batch_is_the_list_of_that_batch(n):
    # n = 2 used to be read as two "batches" (the rows of x, the labels of y) without error
    model, (x, y) = mlp(), batch(n)
    kw = dict(k=2, max_iter=20, tol=1e-10)
    listed = samfast.hessian_eigenvalues(model, F.cross_entropy, [(x, y)], **kw)
    for one in ((x, y), [x, y]):
        assert torch.equal(samfast.hessian_eigenvalues(model, F.cross_entropy, one, **kw),
                           listed)
    assert samfast.hessian_trace(model, F.cross_entropy, (x, y), n_samples=3) == \
        samfast.hessian_trace(model, F.cross_entropy, [(x, y)], n_samples=3)
    cnn, (xi, yi) = classifier(), images(n)
    assert samfast.robust_accuracy(cnn, (xi, yi), steps=2) == \
        samfast.robust_accuracy(cnn, [(xi, yi)], steps=2)


def test_a_list_of_two_batches_stays_two_batches():
    model, (x, y) = mlp(), batch(7)
    two = [(x[:3], y[:3]), (x[3:], y[3:])]
    torch.testing.assert_close(
        samfast.hessian_eigenvalues(model, F.cross_entropy, two, k=2, max_iter=83, tol=1e-12),
        samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, max_iter=83,
                                    tol=1e-12), rtol=1e-9, atol=0)


@pytest.mark.parametrize("data, error, words", [
    (batch()[0], TypeError, "single Tensor"),
    ((batch()[0], batch()[1][:4]), ValueError, "first dimensions differ"),
    ([batch()[0], batch()[0], batch()[1]], TypeError, "batch 0 is a Tensor"),
    ([batch(), batch()[0]], TypeError, "batch 1 is a Tensor"),
    ([(batch()[0],)], TypeError, "tuple of length 1"),
    ([(batch()[0], 3)], TypeError, "without a length"),
    (7, TypeError, "not iterable"),
    ([], ValueError, "no batches"),
    ([(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long))],
     ValueError, "no samples"),
], ids=["tensor", "mismatched-pair", "three-tensors", "tensor-item", "one-tuple",
        "int-targets", "int", "empty", "zero-samples"])
def test_bad_data_names_data_and_says_what_to_pass(data, error, words):
    for fn in (samfast.hessian_eigenvalues, samfast.hessian_trace):
        with pytest.raises(error, match="data") as info:
            fn(mlp(), F.cross_entropy, data)
        assert words in str(info.value)


def test_robust_accuracy_streams_its_batches_and_refuses_none():
    model, forwards = classifier(), []
    model.register_forward_hook(lambda *args: forwards.append(1))

    def batches():
        for seed in range(3):
            before = len(forwards)
            yield images(seed=seed)
            assert len(forwards) > before, "the next batch was drawn before this one was used"
    streamed = samfast.robust_accuracy(model, batches(), steps=1)
    assert streamed == samfast.robust_accuracy(model, [images(seed=s) for s in range(3)],
                                               steps=1)
    with pytest.raises(ValueError, match="data"):
        samfast.robust_accuracy(model, [], steps=1)


# ----------------------------------------------------------------------------------------
# PGD: L2 needs its own radius
# ----------------------------------------------------------------------------------------

def test_l2_without_eps_raises_naming_eps():
    model, (x, y) = classifier(), images()
    for call in (lambda: samfast.pgd_attack(model, x, y, norm="l2"),
                 lambda: samfast.pgd_attack(model, x, y, norm="l2", alpha=0.1),
                 lambda: samfast.robust_accuracy(model, [(x, y)], norm="l2")):
        with pytest.raises(ValueError, match="eps.*l2"):
            call()


def test_pgd_defaults_linf_unchanged_and_l2_step_a_quarter_of_eps():
    model, (x, y) = classifier(), images()

    def attack(**kw):
        return samfast.pgd_attack(model, x, y, steps=3,
                                  generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(attack(), attack(eps=8 / 255, alpha=2 / 255))
    assert torch.equal(attack(eps=0.04), attack(eps=0.04, alpha=2 / 255))
    assert torch.equal(attack(norm="l2", eps=0.5), attack(norm="l2", eps=0.5, alpha=0.125))
    assert not torch.equal(attack(norm="l2", eps=0.5), attack(norm="l2", eps=0.5, alpha=0.1))


# ----------------------------------------------------------------------------------------
# numbers: integer-like accepted, bools and non-finite or negative values refused
# ----------------------------------------------------------------------------------------

def test_numpy_and_tensor_numbers_are_accepted():
    model, (x, y) = mlp(), batch()
    want = samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, max_iter=10,
                                       tol=float(np.float32(1e-6)), seed=3)
    got = samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=np.int64(2),
                                      max_iter=np.int32(10), tol=np.float32(1e-6),
                                      seed=torch.tensor(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert samfast.hessian_trace(model, F.cross_entropy, (x, y), n_samples=np.int64(3),
                                 seed=np.uint8(1)) == \
        samfast.hessian_trace(model, F.cross_entropy, (x, y), n_samples=3, seed=1)
    cnn, (xi, yi) = classifier(), images()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(
        samfast.pgd_attack(cnn, xi, yi, eps=torch.tensor(0.1), alpha=np.float32(0.25),
                           steps=np.int64(2), clamp=(np.float32(0), np.int64(1)),
                           generator=gen()),
        samfast.pgd_attack(cnn, xi, yi, eps=0.1, alpha=float(np.float32(0.25)), steps=2,
                           generator=gen()))
    assert samfast.robust_accuracy(cnn, (xi, yi), steps=np.int16(2), seed=np.int64(4)) == \
        samfast.robust_accuracy(cnn, (xi, yi), steps=2, seed=4)


HESSIAN_BAD = [("k", True), ("k", np.bool_(True)), ("k", 0), ("k", 2.0), ("k", "2"),
               ("max_iter", True), ("max_iter", 0), ("max_iter", 10.0),
               ("tol", True), ("tol", 0), ("tol", -1e-3), ("tol", math.nan), ("tol", math.inf),
               ("tol", "1e-3"), ("seed", False), ("seed", -1), ("seed", 2**64),
               ("seed", 1.5)]
TRACE_BAD = [("n_samples", True), ("n_samples", 0), ("n_samples", 4.0), ("seed", True),
             ("seed", -1)]
PGD_BAD = [("steps", True), ("steps", -1), ("steps", 2.0), ("steps", np.float64(2)),
           ("eps", True), ("eps", -0.1), ("eps", math.nan), ("eps", math.inf),
           ("eps", torch.ones(2)), ("eps", torch.tensor(True)), ("alpha", False), ("alpha", -1.0), ("alpha", math.nan),
           ("alpha", math.inf), ("clamp", (1, 0)), ("clamp", (0, math.nan)),
           ("clamp", (False, 1)), ("clamp", 1.0), ("norm", "l1")]
ROBUST_BAD = [("steps", True), ("steps", -2), ("seed", True), ("seed", -1), ("eps", -1.0),
              ("alpha", math.inf)]


@pytest.mark.parametrize("name, value", HESSIAN_BAD, ids=[f"{n}={v!r}" for n, v in HESSIAN_BAD])
def test_bad_hessian_eigenvalues_numbers_raise_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        samfast.hessian_eigenvalues(mlp(), F.cross_entropy, batch(), **{name: value})


@pytest.mark.parametrize("name, value", TRACE_BAD, ids=[f"{n}={v!r}" for n, v in TRACE_BAD])
def test_bad_hessian_trace_numbers_raise_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        samfast.hessian_trace(mlp(), F.cross_entropy, batch(), **{name: value})


@pytest.mark.parametrize("name, value", PGD_BAD, ids=[f"{n}={v!r}" for n, v in PGD_BAD])
def test_bad_pgd_numbers_raise_naming_the_argument(name, value):
    x, y = images()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        samfast.pgd_attack(classifier(), x, y, **{name: value})


@pytest.mark.parametrize("name, value", ROBUST_BAD, ids=[f"{n}={v!r}" for n, v in ROBUST_BAD])
def test_bad_robust_accuracy_numbers_raise_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        samfast.robust_accuracy(classifier(), images(), **{name: value})


# ----------------------------------------------------------------------------------------
# unconverged eigenvalues are flagged, in the library and in samfast-sharpness
# ----------------------------------------------------------------------------------------

def test_unconverged_eigenvalues_are_flagged():
    model, (x, y) = mlp(), batch(12)
    _, info = samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, max_iter=2,
                                          return_info=True)
    assert info.iterations == 2 and not info.converged
    assert info.eigenvalue_converged == [False, False] and len(info.residuals) == 2
    _, info = samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=2, max_iter=83,
                                          tol=1e-6, return_info=True)
    assert info.converged and info.eigenvalue_converged == [True, True]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = sharpness_cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def save_checkpoint(path: Path, model_name="small_cnn", weights_of=None, **config) -> Path:
    torch.manual_seed(0)
    weights = build_model(weights_of or model_name, 10).state_dict()
    torch.save({"config": {"model": model_name, "dataset": "cifar10",
                           "data_dir": str(DEMO_DATA), **config},
                "model": weights, "epoch": 1}, path)
    return path


def test_cli_marks_unconverged_eigenvalues(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "last.pt")
    code, out, err = run_cli([ckpt, "--k", "2", "--max-iter", "2", "--samples", "40",
                              "--trace-samples", "0", "--device", "cpu"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("lambda_")]
    assert len(rows) == 2 and all(row[-1] == "NO" for row in rows)
    assert out.splitlines()[0].split()[-1] == "converged"
    assert "warning: 2 of 2 eigenvalues did not converge in 2 Lanczos iterations" in err
    assert "--max-iter" in err
    result = __import__("json").loads(out.splitlines()[-1])
    assert result["converged"] is False and result["eigenvalue_converged"] == [False, False]


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = save_checkpoint(tmp_path / "good.pt")
    raw = good.read_bytes()
    files = {"truncated": raw[:len(raw) // 2], "garbage": b"not a checkpoint at all",
             "empty": b""}
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"config": {"model": "small_cnn"}, "model": {}}, tmp_path / "no-dataset.pt")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    save_checkpoint(tmp_path / "wrong-model.pt", weights_of="resnet20")
    save_checkpoint(tmp_path / "unknown-model.pt", model_name="mlp9", weights_of="small_cnn")
    return {
        "missing": (tmp_path / "missing.pt", "No such file"),
        "directory": (tmp_path, "Is a directory"),
        "truncated": (tmp_path / "truncated.pt", "cannot read"),
        "garbage": (tmp_path / "garbage.pt", "cannot read"),
        "empty": (tmp_path / "empty.pt", "empty or truncated"),
        "pickle-of-objects": (tmp_path / "pickled.npy", "cannot read"),
        "plain-dict": (tmp_path / "plain.pt", "not a samfast-train checkpoint"),
        "tensor": (tmp_path / "tensor.pt", "not a samfast-train checkpoint"),
        "no-dataset": (tmp_path / "no-dataset.pt", "dataset None"),
        "wrong-model": (tmp_path / "wrong-model.pt", "do not fit a small_cnn"),
        "unknown-model": (tmp_path / "unknown-model.pt", "model 'mlp9'"),
    }


def test_cli_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    for name, (path, words) in _bad_checkpoints(tmp_path).items():
        code, out, err = run_cli([path, "--device", "cpu"], capsys)
        assert code == 2, name
        assert out == "" and len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("samfast-sharpness: error: checkpoint:") and words in err, \
            (name, err)


BAD_FLAGS = [(["--k", "0"], "--k"), (["--max-iter", "0"], "--max-iter"),
             (["--samples", "-1"], "--samples"), (["--batch-size", "0"], "--batch-size"),
             (["--trace-samples", "-1"], "--trace-samples"), (["--tol", "0"], "--tol"),
             (["--tol", "nan"], "--tol"), (["--tol", "inf"], "--tol"),
             (["--k", "two"], "--k"), (["--device", "gpu0"], "--device"),
             (["--bn-mode", "frozen"], "--bn-mode"), (["--bogus"], "--bogus")]


@pytest.mark.parametrize("flags, name", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, name):
    code, out, err = run_cli([tmp_path / "any.pt", *flags], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and name in err, err


def test_cli_entry_point_bad_checkpoint_has_no_traceback(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    for argv in ([str(tmp_path / "last.pt")], [str(tmp_path / "missing.pt")],
                 [str(tmp_path / "last.pt"), "--k", "0"]):
        proc = subprocess.run([sys.executable, "-m", "samfast.cifar.sharpness_cli", *argv,
                               "--device", "cpu"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert proc.stdout == ""


# ----------------------------------------------------------------------------------------
# install needs only torch and numpy
# ----------------------------------------------------------------------------------------

def test_library_calls_work_without_tqdm_and_matplotlib():
    """tqdm and matplotlib are the [train] extra: samfast's library calls must neither
    import them nor need them. A fresh interpreter has them blocked (a None entry in
    sys.modules: ``import`` fails, ``find_spec`` says not installed, as torch.hub and
    dynamo check) and records every ``import`` of them with the file that made it."""
    package = str(Path(samfast.__file__).resolve().parent)
    script = textwrap.dedent(f"""
        import builtins, sys
        PACKAGE = {package!r}
        BLOCKED = ("tqdm", "matplotlib")
        attempts = []
        for name in BLOCKED:
            sys.modules[name] = None
        real_import = builtins.__import__

        def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and name.split(".")[0] in BLOCKED:
                attempts.append((name, sys._getframe(1).f_code.co_filename))
            return real_import(name, globals, locals, fromlist, level)
        builtins.__import__ = recording_import

        import torch
        import samfast
        from torch import nn
        from torch.nn import functional as F

        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        opt = samfast.SAM(model.parameters(), lr=0.1)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        samfast.hessian_eigenvalues(model, F.cross_entropy, (x, y), k=1, max_iter=3)
        samfast.hessian_trace(model, F.cross_entropy, (x, y), n_samples=2)
        samfast.pgd_attack(model, x, y, steps=2)
        samfast.robust_accuracy(model, [(x, y)], steps=1)
        ours = [(n, f) for n, f in attempts if f.startswith(PACKAGE)]
        assert not ours, ours
        print("ok", attempts)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(package).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
