"""samfast-reproduce at smoke scale: the grid runs, resumes (skips finished runs) and reports."""

from __future__ import annotations

import json

import pytest

from samfast import reproduce


@pytest.mark.parametrize("experiment", reproduce.EXPERIMENTS)
def test_every_experiment_defines_its_runs_for_every_scale(experiment):
    for scale in reproduce.SETTINGS:
        runs = reproduce.runs_of(experiment, scale)
        assert len(runs) >= 3 and all(isinstance(f, list) for f in runs.values())
    late = reproduce.runs_of("late_switch", "full")
    assert late["SGD->SAM@175"] == ["--optimizer", "sam", "--sam-start", "175"]


def test_smoke_late_switch_and_adversarial_run_and_resume(tmp_path, capsys):
    for experiment in ("late_switch", "adversarial"):
        assert reproduce.main([experiment, "--scale", "smoke", "--out", str(tmp_path)]) == 0
    root = tmp_path / "smoke" / "late_switch"
    table = (root / "results.md").read_text()
    assert "SGD->SAM@1" in table and "sharpness" in table
    assert (root / "figure.png").exists()
    settings = json.loads((root / "settings.json").read_text())
    assert settings["epochs"]["value"] == 2 and settings["epochs"]["source"]
    adv = (tmp_path / "smoke" / "adversarial" / "results.md").read_text()
    assert "full AT" in adv
    capsys.readouterr()
    reproduce.main(["late_switch", "--scale", "smoke", "--out", str(tmp_path)])
    assert capsys.readouterr().err.count("skip") == 3  # finished runs are not run again
    # A run with the same configuration in another experiment is copied, not trained again:
    # the sweep's SGD->SAM@0 is late_switch's SAM and its SGD->SAM@1 the late switch.
    reproduce.main(["switch_sweep", "--scale", "smoke", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("copy ") == 2 and err.count("run  ") == 1, err
    sweep = tmp_path / "smoke" / "switch_sweep"
    for mine, theirs in (("SGD__SAM_0", "SAM"), ("SGD__SAM_1", "SGD__SAM_1")):
        assert ((sweep / mine / "seed0" / "summary.json").read_text()
                == (root / theirs / "seed0" / "summary.json").read_text())
    assert "SGD->SAM@2" in (sweep / "results.md").read_text()
    assert (sweep / "vs_switch.png").exists()


def test_estimate_counts_epochs_by_their_measured_cost_and_shared_runs_once():
    table = reproduce.estimate("smoke", sgd_epoch_s=3600.0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    # late_switch at smoke scale: 2 epochs; SGD 2 x 1.0, SAM 2 x 2.0, SGD->SAM@1 1.0 + 2.0
    assert rows["late_switch"] == ["3 x 1", "3", "0", "9", "9.0"]
    # adversarial: standard 2, full AT 2 x 7.1, AT@1 1 + 7.1
    assert rows["adversarial"][2] == "3" and rows["adversarial"][3] == "24"  # 2+14.2+8.1
    # the sweep's @0 (= SAM) and @1 (= late switch) are late_switch's runs: counted once
    assert rows["all, shared runs once"][0].startswith(str(
        sum(len(reproduce.runs_of(e, "smoke")) for e in reproduce.EXPERIMENTS) - 4))


@pytest.mark.parametrize("scale", reproduce.SETTINGS)
def test_every_run_gets_the_scales_settings_and_settings_json_names_every_source(scale):
    from samfast.cifar import config
    for experiment in reproduce.EXPERIMENTS:
        chosen = {k: v for k, (v, _) in reproduce.scale_settings(scale, experiment).items()
                  if k not in reproduce.GRID_KEYS}
        for flags in reproduce.runs_of(experiment, scale).values():
            cfg = config.config_from_flags(reproduce.base_args(scale, None, experiment)
                                           + flags).record()
            # a run's own flags override only what the experiment varies
            kept = {k: v for k, v in chosen.items() if k not in ("rho",)}
            assert {k: cfg[k] for k in kept} == kept
    record = reproduce.settings_record(scale, None)
    identity = config.run_identity(config.parse_config([]), None, 1)
    assert set(identity) - {"data", "world_size"} <= set(record)
    assert set(reproduce.GRID_KEYS) <= set(record)
    assert all(entry["source"] for entry in record.values())
    assert record["momentum"]["value"] == 0.9 and record["augment"]["value"] == "crop_flip"


def test_smoke_generalization_forks_the_late_switches_and_reports_intervals(tmp_path, capsys):
    """The issue-#16 grid: each late switch is forked from its seed's SGD run at the switch
    epoch (the same SGD epochs bit for bit: inherited rows equal the SGD run's), and the
    report gives 95% intervals, paired differences and the share of SAM's gain recovered."""
    assert reproduce.main(["generalization", "--scale", "smoke", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    root = tmp_path / "smoke" / "generalization"
    (k,) = reproduce.switch_epochs("smoke")
    # seed-major (a grid stopped part way leaves whole seeds), a fork after its source run
    started = [line.split(" (")[0].removeprefix("run  ") for line in err.splitlines()
               if line.startswith("run  ")]
    assert started == [f"{name} seed {seed}" for seed in (0, 1)
                       for name in ("SGD", "SAM", f"SGD->SAM@{k}")], started
    for seed in (0, 1):
        assert f"SGD->SAM@{k} seed {seed} (forked from" in err
        sgd = [json.loads(r) for r in
               (root / "SGD" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        late = [json.loads(r) for r in
                (root / f"SGD__SAM_{k}" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [r.pop("inherited") for r in late[:k]] == [True] * k
        assert late[:k] == sgd[:k] and [r["phase"] for r in late[k:]] == ["sam"] * (4 - k)
        summary = json.loads((root / f"SGD__SAM_{k}" / f"seed{seed}" / "summary.json").read_text())
        assert summary["fork"]["epoch"] == k
    text = (root / "results.md").read_text()
    assert "95% t-interval over 2 seeds" in text and "vs SGD (paired)" in text
    assert f"SGD->SAM@{k}:" in text and (root / "figure.png").exists()
    assert set(json.loads((root / "results.json").read_text())) == {"SGD", "SAM", f"SGD->SAM@{k}"}
    settings = json.loads((root / "settings.json").read_text())
    assert settings["epochs"]["value"] == 4 and settings["late_fractions"]["value"] == [0.25, 0.1]


def test_intervals_and_share_recovered():
    mean, half, n = reproduce.mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and abs(half - 4.303 * 1.0 / 3 ** 0.5) < 1e-9
    assert reproduce.mean_ci([5.0])[2] == 1 and reproduce.mean_ci([])[2] == 0
    sgd, sam = [30.0, 31.0, 29.0, 30.5, 30.0], [28.0, 29.0, 27.5, 28.0, 28.5]
    half_way = [(a + b) / 2 for a, b in zip(sgd, sam)]
    point, lo, hi = reproduce._share_recovered(sgd, sam, half_way)
    assert abs(point - 0.5) < 1e-12 and lo <= 0.5 <= hi
    assert reproduce._share_recovered(sgd, sgd, sam)[0] != reproduce._share_recovered(sgd, sgd, sam)[0]  # nan: no gain
