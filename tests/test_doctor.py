"""samfast-doctor and the safe ``backend="auto"``: a kernel that disagrees with the reference
is reported (exit status 1) and never handed out by auto; an explicit backend is honoured."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import samfast
import samfast.backends as backends
from samfast import doctor, selfcheck

FUSED = [b for b in samfast.available_backends("cpu") if b != "reference"]


def broken(namespace, op: str):
    """``namespace`` with ``op`` off by a relative 1e-3 (a plausible miscompiled kernel)."""
    def ascent_(w, g, backup, scale, skip, adaptive, eta):
        namespace.ascent_(w, g, backup, scale, skip, adaptive, eta)
        w.mul_(1 + 1e-3)

    def sq_norm(g, w, adaptive, eta):
        return namespace.sq_norm(g, w, adaptive, eta) * (1 + 1e-3)

    def restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening, wd, nesterov, started):
        namespace.restore_sgd_(w, g, backup, buf, skip, lr, momentum, dampening, wd,
                               nesterov, started)
        buf.add_(1e-3)

    replaced = {"ascent_": ascent_, "sq_norm": sq_norm, "restore_sgd_": restore_sgd_}
    ops = {name: getattr(namespace, name) for name in ("sq_norm", "nonfinite", "ascent_",
                                                        "restore_sgd_")}
    ops[op] = replaced[op]
    return types.SimpleNamespace(**ops)


@pytest.mark.parametrize("backend", FUSED)
def test_self_check_passes_on_every_available_backend(backend):
    checks = selfcheck.check_backend(backend, torch.device("cpu"), n=4099,
                                     dtypes=(torch.float32, torch.bfloat16, torch.float64))
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]


@pytest.mark.parametrize("op", ["ascent_", "sq_norm", "restore_sgd_"])
def test_self_check_catches_a_wrong_kernel(op):
    namespace = broken(backends.ops_namespace(FUSED[0]), op)
    checks = selfcheck.check_ops(namespace, torch.device("cpu"), torch.float32, 4099, 1)
    assert {c.op for c in checks if not c.ok} == {op}


@pytest.fixture
def broken_native(monkeypatch):
    if "native" not in FUSED:
        pytest.skip("samfast._C not built")
    real = backends.ops_namespace
    monkeypatch.setattr(backends, "ops_namespace",
                        lambda name: broken(real(name), "ascent_") if name == "native"
                        else real(name))
    monkeypatch.setattr(backends, "_CHECKED", {})
    monkeypatch.setattr(doctor, "ops_namespace", backends.ops_namespace)


def test_auto_skips_a_wrong_kernel_with_a_warning_naming_the_op(broken_native):
    model = torch.nn.Linear(4, 3)
    with pytest.warns(RuntimeWarning, match=r"does not use 'native'.*ascent_"):
        opt = samfast.SAM(model.parameters(), lr=0.1)
    assert opt.backend == "reference"
    explicit = samfast.SAM(model.parameters(), lr=0.1, backend="native")  # honoured as asked
    assert explicit.backend == "native"


def test_auto_checks_once_per_process(monkeypatch):
    monkeypatch.setattr(backends, "_CHECKED", {})
    calls = []
    real = selfcheck.check_backend
    monkeypatch.setattr(selfcheck, "check_backend",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        samfast.SAM(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    assert len(calls) == (1 if FUSED and samfast.SAM(
        torch.nn.Linear(2, 2).parameters(), lr=0.1).backend != "reference" else 0)


def test_doctor_exits_1_on_a_wrong_kernel(broken_native, capsys):
    assert doctor.run(quick=True, n=4099) == 1
    out = capsys.readouterr().out
    assert "WRONG ascent_" in out and "FAILED" in out


def test_doctor_command_reports_every_cpu_backend_correct(tmp_path):
    """The real entry point, as a user runs it first on a new machine."""
    path = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "samfast", "--quick", "--json", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: every available backend matches the reference" in proc.stdout
    report = json.loads(path.read_text())
    assert report["ok"] and report["versions"]["torch"] == torch.__version__
    cpu = report["devices"]["cpu"]["backends"]
    assert set(cpu) == {b for b in FUSED if b != "triton"} | (
        {"triton"} if "triton" in FUSED and proc.stdout.count("triton:") == 1 else set())
    for name, entry in cpu.items():
        assert entry["checks"] and all(c["ok"] for c in entry["checks"]), name
