"""The CIFAR trainer on tiny subsets of the embedded real CIFAR-10 data: models, data
loading, augmentation, the run configuration, the SGD -> SAM switch, bit-identical resume
after SIGKILL and fork from a snapshot, bad flags. Bad inputs other than flags (data, run
directories, checkpoints) are in test_cli_bad_inputs.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import samfast
from samfast.cifar import config
from samfast.cifar import train as trainer
from samfast.cifar.data import (DataError, Split, augment, epoch_generator, load_cifar,
                                stratified_subset, train_batches)
from samfast.cifar.demo import DEMO_DATA
from samfast.cifar.models import MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(out, *extra):
    return ["--data-dir", str(DEMO_DATA), "--train-subset", "200", "--test-subset", "100",
            "--batch-size", "50", "--out", str(out), "--quiet", "--device", "cpu", *extra]


# -- models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_one_sam_step(name):
    torch.manual_seed(0)
    model = build_model(name, 10)
    opt = samfast.SAM(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        with samfast.running_stats_disabled(model, enabled=opt.perturbed):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert torch.isfinite(loss) and model(x).shape == (4, 10)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_model_sizes_match_the_literature():
    sizes = {n: sum(p.numel() for p in build_model(n).parameters()) / 1e6
             for n in ("wrn16_8", "wrn28_10", "resnet20", "resnet56", "resnet18", "vgg16_bn")}
    assert sizes["wrn16_8"] == pytest.approx(10.96, abs=0.02)
    assert sizes["wrn28_10"] == pytest.approx(36.48, abs=0.02)
    assert sizes["resnet20"] == pytest.approx(0.27, abs=0.005)
    assert sizes["resnet56"] == pytest.approx(0.85, abs=0.01)
    assert sizes["resnet18"] == pytest.approx(11.17, abs=0.02)
    assert sizes["vgg16_bn"] == pytest.approx(14.72, abs=0.05)


# -- data ------------------------------------------------------------------------------------

def _write_official(root: Path, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(len(x)), 5)
    for i, idx in enumerate(parts, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1),
                         "labels": y[idx].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": xt.transpose(0, 3, 1, 2).reshape(len(xt), -1),
                     "labels": yt.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_official_format_matches_npz_and_torchvision(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 25).astype(np.uint8)
    xt = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    yt = rng.integers(0, 10, 7).astype(np.uint8)
    _write_official(tmp_path / "official", x, y, xt, yt)
    # Our fixture is not the real file set, so its MD5s differ from torchvision's list.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, test = load_cifar(str(tmp_path / "official"))
    ref = torchvision.datasets.CIFAR10(str(tmp_path / "official"), train=True)
    assert np.array_equal(train.x.permute(0, 2, 3, 1).numpy(), ref.data)
    assert train.y.tolist() == list(ref.targets) == y.tolist()
    assert np.array_equal(test.x.permute(0, 2, 3, 1).numpy(), xt)
    (tmp_path / "npz").mkdir()
    np.savez_compressed(tmp_path / "npz" / "train_0.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "npz" / "test.npz", x=xt, y=yt)
    train2, test2 = load_cifar(str(tmp_path / "npz"))
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y)
    assert torch.equal(test.x, test2.x) and torch.equal(test.y, test2.y)


def test_corrupt_or_wrong_shaped_data_gives_a_clear_error(tmp_path):
    (tmp_path / "train_0.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2))
    with pytest.raises(DataError, match="train_0.npz"):
        load_cifar(str(tmp_path))
    np.savez(tmp_path / "train_0.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2))
    with pytest.raises(DataError, match=r"\(N, 32, 32, 3\)"):
        load_cifar(str(tmp_path))
    np.savez(tmp_path / "train_0.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 12]))
    with pytest.raises(DataError, match="labels"):
        load_cifar(str(tmp_path))
    with pytest.raises(DataError, match="no cifar10 data"):
        load_cifar(str(tmp_path / "empty"))


def test_embedded_demo_data_is_intact_and_stratified():
    import hashlib
    for line in (DEMO_DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((DEMO_DATA / name).read_bytes()).hexdigest() == digest
    train, test = load_cifar(str(DEMO_DATA))
    assert torch.bincount(train.y).tolist() == [250] * 10
    assert torch.bincount(test.y).tolist() == [50] * 10
    sub = stratified_subset(train, 200, seed=3)
    assert torch.bincount(sub.y).tolist() == [20] * 10


def test_augmentation_keeps_labels_and_shapes_and_only_shifts_and_flips():
    train, _ = load_cifar(str(DEMO_DATA))
    split = Split(train.x[:64], train.y[:64])
    gen = epoch_generator(0, 0)
    order = torch.randperm(64, generator=epoch_generator(0, 0))
    batches = list(train_batches(split, 20, gen))
    assert [len(b[1]) for b in batches] == [20, 20, 20, 4]
    assert torch.equal(torch.cat([b[1] for b in batches]), split.y[order])
    x0 = batches[0][0][0]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32
    assert 0 <= float(x0.min()) and float(x0.max()) <= 1
    # Brute force: the output is some 32x32 window of the zero-padded image, maybe flipped.
    src = torch.nn.functional.pad(split.x[order[0]], (4, 4, 4, 4)).float() / 255
    windows = [w for dy in range(9) for dx in range(9)
               for w in (src[:, dy:dy + 32, dx:dx + 32], src[:, dy:dy + 32, dx:dx + 32].flip(2))]
    assert any(torch.equal(x0, w) for w in windows)
    cut = augment(split.x[:16], epoch_generator(1, 0), cutout=8)
    assert cut.shape == (16, 3, 32, 32) and cut.dtype == torch.uint8
    assert all(int((c == 0).all(0).sum()) >= 16 for c in cut)  # a zeroed hole in every image


def test_augmentation_modes_flip_only_or_leave_the_images_alone():
    train, _ = load_cifar(str(DEMO_DATA))
    x = train.x[:32]
    assert torch.equal(augment(x, epoch_generator(0, 0), mode="none"), x)
    flipped = augment(x, epoch_generator(0, 0), mode="flip")
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)
    # cutout still applies on its own
    assert all(int((c == 0).all(0).sum()) >= 16
               for c in augment(x, epoch_generator(1, 0), cutout=8, mode="none"))
    split = Split(x, train.y[:32])
    batches = list(train_batches(split, 32, epoch_generator(0, 0), augmentation="none"))
    order = torch.randperm(32, generator=epoch_generator(0, 0))
    assert torch.equal(batches[0][0], x[order].float() / 255)


# -- the run configuration -------------------------------------------------------------------

def test_every_flag_keeps_its_name_and_default():
    old = {"dataset": "cifar10", "data_dir": None, "download": False, "train_subset": None,
           "test_subset": None, "cutout": 0, "model": "small_cnn", "epochs": 10,
           "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
           "nesterov": False, "lr_schedule": "step_wrn", "label_smoothing": 0.0,
           "optimizer": "sam", "rho": None, "eta": 0.0, "sam_start": 0, "sam_end": None,
           "reset_momentum": False, "ddp_ascent": "global", "backend": "auto",
           "sharpness_every": 0, "sharpness_samples": 1024, "sharpness_k": 1,
           "sharpness_iters": 20, "adv_start": None, "adv_end": None, "adv_eps": 8 / 255,
           "adv_alpha": 2 / 255, "adv_steps": 10, "adv_norm": "linf", "eval_robust_every": 0,
           "eval_pgd_steps": 20, "eval_robust_samples": 500, "amp": "none",
           "channels_last": False, "compile": False,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "seed": 0,
           "deterministic": False, "out": "runs/latest", "resume": False,
           "checkpoint_every": 1, "eval_every": 1, "eval_batch_size": 500, "quiet": False}
    parser = config.build_parser()
    parsed = vars(parser.parse_args([]))
    assert {k: parsed[k] for k in old} == old
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--" + k.replace("_", "-") for k in old} <= flags
    new = {"augment": "crop_flip", "overwrite": False, "snapshot_epochs": (),
           "fork_from": None, "fork_epoch": None, "sam_policy": "switch", "interval_k": 2,
           "looksam_k": 5, "looksam_alpha": 0.7, "random_p": 0.5, "random_p_end": None,
           "random_seed": None, "adaptive_delta": 0.9, "adaptive_lambda1": -1.0,
           "adaptive_lambda2": 1.0, "fsdp": False}
    assert set(parsed) == set(old) | set(new) and {k: parsed[k] for k in new} == new


def test_what_does_not_affect_the_result_is_exactly_where_and_how_a_run_reports():
    free = {f.name for f in dataclasses.fields(config.RunConfig)
            if config.affects(f.name) is config.Affects.NOTHING}
    assert free == {"download", "out", "resume", "overwrite", "checkpoint_every",
                    "snapshot_epochs", "fork_from", "fork_epoch", "eval_batch_size", "quiet"}
    assert config.affects("data_dir") is config.Affects.DATA
    base = config.parse_config(["--device", "cpu"])
    key = config.run_key(config.run_identity(base, {"train": "a", "test": "b"}, 1))
    changed = {"epochs": 11, "augment": "flip", "backend": "reference", "test_subset": 50,
               "model": "resnet20", "eval_every": 2, "sam_start": 3, "rho": 0.1}
    for name, value in changed.items():
        other = dataclasses.replace(base, **{name: value})
        assert config.run_key(config.run_identity(other, {"train": "a", "test": "b"}, 1)) != key
    for name, value in {"out": "elsewhere", "quiet": True, "data_dir": "/copy"}.items():
        other = dataclasses.replace(base, **{name: value})
        assert config.run_key(config.run_identity(other, {"train": "a", "test": "b"}, 1)) == key
    assert config.run_key(config.run_identity(base, {"train": "a", "test": "c"}, 1)) != key
    assert config.run_key(config.run_identity(base, {"train": "a", "test": "b"}, 2)) != key


def test_config_record_round_trips_and_an_old_record_takes_the_defaults():
    cfg = config.parse_config(["--snapshot-epochs", "3,1", "--augment", "flip", "--epochs", "5",
                               "--device", "cpu"])
    assert cfg.snapshot_epochs == (1, 3)
    record = json.loads(json.dumps(cfg.record()))
    assert config.RunConfig.from_record(record) == cfg
    old = {k: v for k, v in record.items() if k != "augment"}
    assert config.RunConfig.from_record({**old, "gone": 1}).augment == "crop_flip"
    assert config.to_argv({"snapshot_epochs": (1, 3), "nesterov": True, "rho": None,
                           "lr": 0.05}) == ["--snapshot-epochs", "1,3", "--nesterov", "--lr",
                                            "0.05"]


# -- the trainer -----------------------------------------------------------------------------

def test_sam_switch_happens_at_the_right_epoch_and_doubles_passes(tmp_path, monkeypatch,
                                                                   training_passes):
    passes = training_passes
    per_epoch = []

    real_epoch = trainer.train_epoch

    def counting_epoch(*a, **k):
        start = len(passes)
        out = real_epoch(*a, **k)
        per_epoch.append(len(passes) - start)
        return out
    monkeypatch.setattr(trainer, "train_epoch", counting_epoch)
    summary = trainer.run(trainer.parse_config(tiny_args(tmp_path, "--epochs", "3",
                                                         "--sam-start", "2")))
    assert per_epoch == [4, 4, 8]  # 200 images / 50 per batch; two passes once SAM is on
    assert summary["sam_epochs"] == 1 and summary["epochs"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sgd", "sgd", "sam"]
    assert set(rows[0]) >= {"epoch", "phase", "lr", "train_loss", "train_acc", "test_loss",
                            "test_acc", "epoch_time_s"}
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"test_acc", "test_loss", "train_loss", "epochs", "sam_epochs", "wall_time_s",
            "config", "versions"} <= set(saved)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = tiny_args(tmp_path / "killed", "--epochs", "6", "--sam-start", "3",
                     "--deterministic", "--lr-schedule", "cosine")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "samfast.cifar.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                epoch = torch.load(ckpt, weights_only=True)["epoch"]
            except Exception:  # noqa: BLE001 - mid-rename on another file system
                epoch = 0
            if epoch >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 6, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    trainer.run(trainer.parse_config(args + ["--resume"]))
    trainer.run(trainer.parse_config(tiny_args(tmp_path / "straight", "--epochs", "6",
                                               "--sam-start", "3", "--deterministic",
                                               "--lr-schedule", "cosine")))
    a, b = _weights(ckpt), _weights(tmp_path / "straight" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == list(range(6))


def test_every_policy_option_belongs_to_one_policy():
    from samfast.cifar import config
    assert set(config.POLICY_OPTIONS) == set(config.SAM_POLICIES) - {"switch"}
    options = [n for names in config.POLICY_OPTIONS.values() for n in names]
    fields = [f.name for f in dataclasses.fields(config.RunConfig)]
    assert sorted(options) == sorted(n for n in fields if n.split("_")[0] in
                                     ("interval", "looksam", "random", "adaptive"))


def test_resume_with_other_settings_refuses(tmp_path):
    trainer.run(trainer.parse_config(tiny_args(tmp_path, "--epochs", "1")))
    with pytest.raises(trainer.RunError, match="--lr 0.1 -> 0.3"):
        trainer.run(trainer.parse_config(tiny_args(tmp_path, "--epochs", "1", "--lr", "0.3",
                                                   "--resume")))


@pytest.mark.parametrize("flags, name", [
    (["--model", "resnet99"], "--model"), (["--epochs", "0"], "--epochs"),
    (["--epochs", "10", "--sam-start", "11"], "--sam-start"),
    (["--sam-start", "5", "--sam-end", "3", "--epochs", "10"], "--sam-end"),
    (["--rho", "-0.1"], "--rho"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--amp", "fp32"], "--amp"), (["--backend", "magic"], "--backend"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--train-subset", "3"], "--train-subset"), (["--cutout", "40"], "--cutout"),
    # a policy's option without that policy would be ignored; a policy without SAM epochs too
    (["--optimizer", "sam", "--interval-k", "4"], "--interval-k: is an option of --sam-policy "
                                                   "interval; this run's policy is switch"),
    (["--optimizer", "sam", "--sam-policy", "looksam", "--random-p", "0.1"], "--random-p"),
    (["--optimizer", "sam", "--sam-policy", "random", "--adaptive-delta", "0.5"],
     "--adaptive-delta"),
    (["--optimizer", "sam", "--sam-policy", "adaptive", "--looksam-alpha", "0.2"],
     "--looksam-alpha"),
    (["--optimizer", "sgd", "--sam-policy", "interval"], "--sam-policy: interval decides"),
])
def test_bad_flags_fail_before_any_work_naming_the_flag(flags, name, capsys):
    with pytest.raises(SystemExit) as exc:
        trainer.parse_config(["--out", "/nonexistent/never-created", *flags])
    assert exc.value.code == 2
    assert name in capsys.readouterr().err
    assert not Path("/nonexistent/never-created").exists()


def test_cli_reports_missing_data_without_a_traceback(tmp_path):
    code = trainer.main(["--data-dir", str(tmp_path), "--epochs", "1", "--out",
                         str(tmp_path / "o"), "--quiet"])
    assert code == 2


def test_sharpness_is_logged_and_the_cli_reads_the_checkpoint(tmp_path, capsys):
    summary = trainer.run(trainer.parse_config(tiny_args(
        tmp_path, "--epochs", "2", "--sharpness-every", "1", "--sharpness-samples", "60",
        "--sharpness-k", "2", "--sharpness-iters", "6")))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("sharpness" in r for r in rows)
    assert summary["sharpness"] == rows[-1]["sharpness"] > 0
    assert len(summary["hessian_top"]) == 2 and summary["hessian_top"][0] >= summary["hessian_top"][1]
    from samfast.cifar import sharpness_cli
    capsys.readouterr()
    assert sharpness_cli.main([str(tmp_path / "last.pt"), "--data-dir", str(DEMO_DATA),
                               "--k", "2", "--samples", "60", "--max-iter", "30",
                               "--trace-samples", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["eigenvalues"]) == 2 and "trace" in result


def test_late_switch_to_adversarial_training_and_robust_accuracy(tmp_path, monkeypatch):
    calls = []
    real = samfast.pgd_attack

    def counting(*a, **k):
        calls.append(k["steps"])
        return real(*a, **k)
    monkeypatch.setattr(samfast, "pgd_attack", counting)
    cfg = trainer.parse_config(tiny_args(tmp_path, "--epochs", "3", "--adv-start", "2",
                                         "--adv-eps", "4/255", "--adv-alpha", "1/255",
                                         "--adv-steps", "2", "--eval-robust-every", "3",
                                         "--eval-pgd-steps", "3", "--eval-robust-samples", "20",
                                         "--sam-start", "1"))
    assert cfg.adv_eps == pytest.approx(4 / 255)
    summary = trainer.run(cfg)
    assert calls == [2] * 4  # the 4 training batches of epoch 2 only (PGD-2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sgd", "sam", "sam+adv"]
    assert summary["adversarial_epochs"] == 1
    assert 0 <= summary["robust_acc"] <= 100 and "robust_acc" in rows[-1]


@pytest.mark.parametrize("flags, name", [
    (["--adv-end", "3"], "--adv-end"), (["--adv-start", "20"], "--adv-start"),
    (["--adv-eps", "x/255"], "--adv-eps"), (["--adv-steps", "-1"], "--adv-steps"),
    (["--sharpness-every", "-1"], "--sharpness-every"),
])
def test_bad_adversarial_and_sharpness_flags(flags, name, capsys):
    with pytest.raises(SystemExit):
        trainer.parse_config(["--epochs", "10", *flags])
    assert name in capsys.readouterr().err


def test_fp16_amp_with_sam_trains(tmp_path):
    # fp16 autocast is emulated on this CPU (slow): one small SAM epoch
    summary = trainer.run(trainer.parse_config(tiny_args(tmp_path, "--epochs", "1", "--amp",
                                                         "fp16", "--test-subset", "20")))
    assert summary["sam_epochs"] == 1 and math.isfinite(summary["train_loss"])


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl without what is timed (epoch and optimizer times, the cost derived from
    them) and the inherited mark."""
    return [{k: v for k, v in json.loads(line).items()
             if k not in ("epoch_time_s", "optimizer_s", "cost_sgd_steps", "inherited")}
            for line in path.read_text().splitlines()]


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["epoch"] == sb["epoch"]
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ma, mb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert ma.keys() == mb.keys() and all(
        torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)


def test_a_fork_of_the_sgd_run_at_k_is_the_switch_run_bit_for_bit(tmp_path):
    """The paired design: SGD -> SAM at K forked from the SGD run's snapshot at K ends exactly
    where the same switch run trained from scratch does."""
    k = "2"
    common = ("--epochs", "3", "--deterministic", "--lr-schedule", "cosine")
    trainer.run(trainer.parse_config(tiny_args(tmp_path / "sgd", *common, "--optimizer", "sgd",
                                               "--snapshot-epochs", k)))
    trainer.run(trainer.parse_config(tiny_args(tmp_path / "switch", *common, "--optimizer",
                                               "sam", "--sam-start", k, "--snapshot-epochs", k)))
    summary = trainer.run(trainer.parse_config(tiny_args(
        tmp_path / "fork", *common, "--optimizer", "sam", "--sam-start", k,
        "--fork-from", str(tmp_path / "sgd"), "--fork-epoch", k)))
    _assert_same_state(tmp_path / "sgd" / "epoch_2.pt", tmp_path / "switch" / "epoch_2.pt")
    _assert_same_state(tmp_path / "fork" / "last.pt", tmp_path / "switch" / "last.pt")
    fork_metrics = tmp_path / "fork" / "metrics.jsonl"
    assert _rows(fork_metrics) == _rows(tmp_path / "switch" / "metrics.jsonl")
    rows = [json.loads(line) for line in fork_metrics.read_text().splitlines()]
    assert [r.get("inherited", False) for r in rows] == [True, True, False]
    assert summary["fork"] == {"from": str(tmp_path / "sgd" / "epoch_2.pt"), "epoch": 2}
    assert summary["sam_epochs"] == 1
    assert sorted(p.name for p in (tmp_path / "fork").iterdir()) == [
        "curves.png", "last.pt", "metrics.jsonl", "summary.json"]
    # A fork to ASAM takes ASAM's own options, not the SGD run's (rho 0.05, not adaptive).
    trainer.run(trainer.parse_config(tiny_args(
        tmp_path / "asam", *common, "--optimizer", "asam", "--sam-start", k,
        "--fork-from", str(tmp_path / "sgd" / "epoch_2.pt"))))
    asam = torch.load(tmp_path / "asam" / "last.pt", weights_only=True)
    group = asam["optimizer"]["param_groups"][0]
    assert group["rho"] == 2.0 and group["adaptive"] is True
