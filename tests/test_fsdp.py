"""SAM on FSDP2 (fully_shard) models with real processes: gloo on the CPU, 2 and 3 ranks.

One spawn per world size runs every scenario (each spawn costs seconds of start-up on a busy
CPU); the workers save what they saw and the tests below compare it with single-process SAM
(reference backend) on the full batch. With 3 ranks the second Linear's 4 output rows shard
as 2 + 2 + 0: rank 2 holds empty shards.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import samfast
import use_it_with
from samfast.distributed import sam_step
from test_distributed import _free_port, gloo_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

STEPS = 20
BATCH = 24  # divisible by 2 and 3: every rank's shard of the batch has the same size
SAVE_AT = 10
NAN_ASCENT_STEP, NAN_DESCENT_STEP = 5, 11
SKIPPED_MARK = 7
SNIPPET_EPOCHS, SNIPPET_STEPS = 2, 5  # the README snippet: 2 epochs of 5 batches
# name -> (dtype, SAM options, sam_step options)
SCENARIOS = {
    "sam64": (torch.float64, {}, {}),
    "asam64": (torch.float64, {"adaptive": True, "eta": 0.01, "rho": 0.5},
               {"accumulation_steps": 2, "clip_grad_norm": 0.5}),
    "sam32": (torch.float32, {}, {}),
    # policies through sam_step: one-pass steps between SAM steps; decisions from the global
    # squared gradient norm (the shards' sums, all-reduced)
    "interval64": (torch.float64, {"policy": lambda: samfast.Interval(3)}, {}),
    "adaptive64": (torch.float64, {"policy": lambda: samfast.AdaptiveSAM(STEPS)}, {}),
    # the same seeded draws on every rank
    "random64": (torch.float64, {"policy": lambda: samfast.RandomSwitch(0.4, seed=3)}, {}),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}
# Every scenario runs on each backend on the local shards (the fused ones on flat mirrors of
# them, samfast.flat.ShardedFlatBucket) and is compared with single-process reference SAM.
# Triton stays out: its interpreter would make each spawn minutes long, and the fused
# orchestration it would exercise is the native backend's.
FSDP_BACKENDS = [b for b in samfast.available_backends("cpu") if b != "triton"]
# A base optimizer other than torch's SGD: the fused backends hand it the shards, scattered
# from their mirrors, instead of their own fused update.
ADAMW = (torch.float64, {"base_optimizer": torch.optim.AdamW, "lr": 0.01}, {})


def make_model(dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def make_opt(params, backend="reference", **options):
    options = {k: v() if k == "policy" else v for k, v in options.items()}  # a fresh policy
    kw = {"rho": 0.1, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **options}
    if kw.get("base_optimizer", torch.optim.SGD) is not torch.optim.SGD:
        del kw["momentum"]
    return samfast.SAM(params, backend=backend, **kw)


def full_batch(step: int, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(BATCH, 6, generator=gen, dtype=dtype),
            torch.randint(0, 4, (BATCH,), generator=gen))


def loss_fn_for(model, x, y, step_options):
    if step_options.get("accumulation_steps"):
        k = step_options["accumulation_steps"]
        micro = list(zip(x.chunk(k), y.chunk(k)))
        return lambda i: F.cross_entropy(model(micro[i][0]), micro[i][1])
    return lambda: F.cross_entropy(model(x), y)


# -- the workers ------------------------------------------------------------------------------

def _sharded_model(dtype):
    from torch.distributed.fsdp import fully_shard

    model = make_model(dtype)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _train(model, opt, rank, world, steps, dtype, step_options, poison=False):
    for step in steps:
        x, y = full_batch(step, dtype)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        if poison and step == NAN_DESCENT_STEP:
            # explicit steps, so that one element of rank 1's shard of the descent gradient
            # alone is NaN: every rank must skip the base step with it
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(xs), ys).backward()
            if rank == 1:
                next(model.parameters()).grad.to_local()[0, 0] = float("nan")
            opt.second_step(zero_grad=True)
            continue
        loss_fn = loss_fn_for(model, xs, ys, step_options)
        if poison and step == NAN_ASCENT_STEP and rank == 1:
            calls = []

            def poisoned(*args, inner=loss_fn):  # NaN in rank 1's ascent pass only
                calls.append(1)
                loss = inner(*args)
                return loss * float("nan") if len(calls) == 1 else loss
            loss_fn = poisoned
        sam_step(model, opt, loss_fn, **step_options)


def _snapshot(model, opt) -> dict:
    """Full weights (an all-gather: every rank calls it), local shards, the momentum's shards."""
    params = dict(model.named_parameters())
    return {"full": {k: p.full_tensor().detach().clone() for k, p in params.items()},
            "local": {k: p.to_local().detach().clone() for k, p in params.items()},
            "momentum": {k: opt.state[p]["momentum_buffer"].to_local().clone()
                         for k, p in params.items() if "momentum_buffer" in opt.state[p]},
            "skipped": opt.skipped_steps, "sam_steps": opt.counters["sam_steps"],
            "backend": opt.backend}


def _errors(world) -> dict:
    """What unsupported uses raise (no collective runs before the raise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _sharded_model(torch.float64)
    seen = {}

    def record(name, fn):
        try:
            fn()
            seen[name] = None
        except (ValueError, TypeError) as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = make_opt(model.parameters(), backend="auto")
        make_opt(model.parameters(), backend="auto")
    seen["auto_backend"] = auto.backend
    seen["auto_warnings"] = [str(w.message) for w in caught if "samfast" in str(w.message)]
    record("ascent_local", lambda: sam_step(model, auto, lambda: None, ascent="local"))
    if "native" in FSDP_BACKENDS:
        moved = _sharded_model(torch.float64)
        fused = make_opt(moved.parameters(), backend="native")
        moved.float()
        x, y = full_batch(0, torch.float32)

        def step_after_the_cast():
            try:
                sam_step(moved, fused, lambda: F.cross_entropy(moved(x), y))
            except RuntimeError as exc:  # raised before any collective, on every rank
                seen["moved"] = f"RuntimeError: {exc}"
        step_after_the_cast()
    record("grad_scaler", lambda: auto.first_step(grad_scaler=torch.amp.GradScaler("cpu")))
    record("looksam", lambda: setattr(auto, "policy", samfast.LookSAM()))
    record("mixed", lambda: make_opt([*model.parameters(), torch.zeros(3, requires_grad=True)]))
    hsdp = make_model(torch.float64)  # HSDP: replicate over mesh dim 0, shard over dim 1
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("r", "s")))
    record("hsdp", lambda: make_opt(hsdp.parameters()))
    return seen


def _snippet_loader(rank, world):
    return [tuple(t.chunk(world)[rank] for t in full_batch(step, torch.float64))
            for step in range(SNIPPET_STEPS)]


def _readme_snippets(rank, world, out) -> dict:
    """The README's FSDP2 snippets: training with a checkpoint per epoch, then a new model
    resumed from the first epoch's checkpoint and trained through the second."""
    model = make_model(torch.float64)
    loader = _snippet_loader(rank, world)
    opt = use_it_with.fsdp_loop(model, [model[0], model[2]], loader, SNIPPET_EPOCHS, out)
    results = {"snippet": _snapshot(model, opt)}
    model = make_model(torch.float64)
    opt = use_it_with.fsdp_resume(model, [model[0], model[2]], f"{out}/epoch0")
    for x, y in loader:  # the second epoch
        sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
    results["snippet_resumed"] = _snapshot(model, opt)
    return results


def _worker(rank, world, port, out, shared):
    with gloo_group(rank, port, world):
        results = {"errors": _errors(world)}
        for backend in FSDP_BACKENDS:
            for name, (dtype, options, step_options) in {**SCENARIOS, "adamw64": ADAMW}.items():
                model = _sharded_model(dtype)
                opt = make_opt(model.parameters(), backend, **options)
                checkpoint = os.path.join(shared, f"world{world}_{name}_{backend}")
                _train(model, opt, rank, world, range(SAVE_AT), dtype, step_options)
                if name == "sam64":
                    opt.skipped_steps = SKIPPED_MARK  # samfast's own entry must round-trip too
                    samfast.fsdp.save(model, opt, checkpoint)
                _train(model, opt, rank, world, range(SAVE_AT, STEPS), dtype, step_options)
                results[name, backend] = _snapshot(model, opt)
                if name == "sam64":  # a fresh model and optimizer resumed from the checkpoint
                    model = _sharded_model(dtype)
                    opt = make_opt(model.parameters(), backend, **options)
                    samfast.fsdp.load(model, opt, checkpoint)
                    _train(model, opt, rank, world, range(SAVE_AT, STEPS), dtype, step_options)
                    results["resumed", backend] = _snapshot(model, opt)
                    # the checkpoint the 2-rank spawn (run first) wrote, resharded onto 3 ranks
                    other = os.path.join(shared, f"world2_{name}_{backend}")
                    if world == 3 and os.path.isdir(other):
                        model = _sharded_model(dtype)
                        opt = make_opt(model.parameters(), backend, **options)
                        samfast.fsdp.load(model, opt, other)
                        _train(model, opt, rank, world, range(SAVE_AT, STEPS), dtype,
                               step_options)
                        results["resharded", backend] = _snapshot(model, opt)
            model = _sharded_model(torch.float64)
            opt = make_opt(model.parameters(), backend)
            _train(model, opt, rank, world, range(STEPS), torch.float64, {}, poison=True)
            results["nan", backend] = _snapshot(model, opt)
        results.update(_readme_snippets(rank, world, out))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Every rank's results from one spawn of ``world`` processes."""
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    shared = tmp_path_factory.getbasetemp() / "fsdp_checkpoints"  # read across world sizes
    shared.mkdir(exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), str(out), str(shared)), nprocs=world,
             join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- single-process SAM on the full batch ------------------------------------------------------

@functools.cache  # shared by the world sizes and backends
def reference_run(name, omit=()):
    dtype, options, step_options = {**SCENARIOS, "adamw64": ADAMW}[name]
    model = make_model(dtype)
    opt = make_opt(model.parameters(), **options)
    for step in range(STEPS):
        if step in omit:
            continue
        x, y = full_batch(step, dtype)
        sam_step(model, opt, loss_fn_for(model, x, y, step_options), **step_options)
    return model, opt


def assert_equals_reference(ranks, key, model, dtype):
    for rank in ranks:  # every rank gathered the same full weights
        for k, v in rank[key]["full"].items():
            assert torch.equal(v, ranks[0][key]["full"][k]), (key, k)
    tol = TOLERANCE[dtype]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0][key]["full"][k], v, rtol=tol, atol=tol)


# -- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FSDP_BACKENDS)
@pytest.mark.parametrize("name", [*SCENARIOS, "adamw64"])
def test_fsdp2_equals_single_process_sam_on_the_full_batch(ranks, name, backend):
    dtype, options, step_options = {**SCENARIOS, "adamw64": ADAMW}[name]
    key = (name, backend)
    model, opt = reference_run(name)
    assert all(r[key]["backend"] == backend for r in ranks)
    assert_equals_reference(ranks, key, model, dtype)
    assert all(r[key]["sam_steps"] == opt.counters["sam_steps"] for r in ranks)
    if "policy" in options:  # both kinds of step were taken
        assert 0 < opt.counters["sam_steps"] < STEPS
    assert all(r[key]["skipped"] == (SKIPPED_MARK if name == "sam64" else 0) for r in ranks)


@pytest.mark.parametrize("backend", FSDP_BACKENDS)
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks, backend):
    # a NaN in rank 1's ascent pass (NaN everywhere once reduce-scattered) and a single NaN in
    # rank 1's shard of a descent gradient: both steps skipped everywhere, as if not taken
    assert [r["nan", backend]["skipped"] for r in ranks] == [2] * len(ranks)
    model, _ = reference_run("sam64", omit=(NAN_ASCENT_STEP, NAN_DESCENT_STEP))
    assert_equals_reference(ranks, ("nan", backend), model, torch.float64)


@pytest.mark.parametrize("backend", FSDP_BACKENDS)
def test_resume_from_a_sharded_dcp_checkpoint_is_bit_identical(ranks, backend):
    for rank in ranks:
        for what in ("local", "momentum"):
            for k, v in rank["sam64", backend][what].items():
                assert torch.equal(rank["resumed", backend][what][k], v), (what, k)
        assert rank["resumed", backend]["skipped"] == SKIPPED_MARK


@pytest.mark.parametrize("backend", FSDP_BACKENDS)
def test_a_checkpoint_of_2_ranks_resumes_on_3(ranks, backend):
    """torch.distributed.checkpoint reshards the weights and the momentum (for the fused
    backends: loaded through DTensors into their flat buffers) onto another world size: 10
    steps on 2 ranks, 10 on 3, equal to single-process SAM on the full batch."""
    if len(ranks) != 3:
        pytest.skip("the 3-rank spawn loads what the 2-rank one saved")
    if ("resharded", backend) not in ranks[0]:
        pytest.skip("the 2-rank spawn did not run in this session")
    model, _ = reference_run("sam64")
    assert_equals_reference(ranks, ("resharded", backend), model, torch.float64)
    assert all(r["resharded", backend]["skipped"] == SKIPPED_MARK for r in ranks)


def test_readme_snippets_equal_single_process_sam_and_resume_bit_identically(ranks):
    model = make_model(torch.float64)
    opt = samfast.SAM(model.parameters(), lr=0.05, momentum=0.9, backend="reference")
    for _ in range(SNIPPET_EPOCHS):
        for step in range(SNIPPET_STEPS):
            x, y = full_batch(step, torch.float64)
            sam_step(model, opt, lambda: F.cross_entropy(model(x), y))
    assert_equals_reference(ranks, "snippet", model, torch.float64)
    for rank in ranks:
        for what in ("local", "momentum"):
            for k, v in rank["snippet"][what].items():
                assert torch.equal(rank["snippet_resumed"][what][k], v), (what, k)
        assert rank["snippet"]["backend"] == "reference"


def test_unsupported_uses_are_refused_by_name(ranks):
    for rank in ranks:
        seen = rank["errors"]
        # backend="auto" picks the reference (memory first), saying why once per process
        assert seen["auto_backend"] == "reference"
        assert len(seen["auto_warnings"]) == 1 and "flat mirrors" in seen["auto_warnings"][0]
        if "moved" in seen:  # a fused backend's mirror does not follow a cast of the model
            assert seen["moved"].startswith("RuntimeError: a parameter moved to cpu/torch.float32")
        assert seen["ascent_local"].startswith("ValueError: Invalid ascent: 'local'")
        assert seen["grad_scaler"].startswith("ValueError: Invalid grad_scaler")
        assert seen["looksam"].startswith("ValueError: Invalid policy: LookSAM")
        assert seen["mixed"].startswith("ValueError: Invalid params")
        assert seen["hsdp"].startswith("ValueError: Invalid params: a 2-dimensional device mesh")


# -- the trainer: samfast-train --fsdp under torchrun -------------------------------------------

def _torchrun(out, *flags):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from samfast.cifar.demo import DEMO_DATA
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or \
        shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "samfast.cifar.train",
           "--data-dir", str(DEMO_DATA), "--train-subset", "200", "--test-subset", "100",
           "--batch-size", "50", "--epochs", "3", "--sam-start", "1", "--out", str(out),
           "--quiet", "--device", "cpu", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "last.pt", weights_only=True)


def _max_relative_error(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()
                     / b[k].double().abs().max().clamp(min=1e-30)) for k in a)


def test_trainer_fsdp_equals_ddp_and_resumes_from_its_snapshot_bit_identically(tmp_path):
    """SGD for an epoch, then SAM, on the native backend (under --fsdp its flat mirrors of the
    shards): under --fsdp as under DDP (only rounding differs), and a fork from the epoch-2
    snapshot (the full tensors gathered, then resharded) ends bitwise where the straight run
    does. (Across backends the runs differ by up to ~3e-3 after 3 epochs: a max-pool / ReLU
    near-tie amplifies rounding, as it does for 1-ulp-nudged initial weights on one
    backend.)"""
    if "native" not in FSDP_BACKENDS:
        pytest.skip("samfast._C not built")
    straight = _torchrun(tmp_path / "fsdp", "--fsdp", "--snapshot-epochs", "2",
                         "--backend", "native")
    forked = _torchrun(tmp_path / "fork", "--fsdp", "--fork-from",
                       str(tmp_path / "fsdp" / "epoch_2.pt"), "--backend", "native")
    ddp = _torchrun(tmp_path / "ddp", "--backend", "native")
    for ckpt in (forked, ddp):
        assert ckpt["model"].keys() == straight["model"].keys()
        assert ckpt["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    momentum = {name: {i: s["momentum_buffer"] for i, s in ckpt["optimizer"]["state"].items()}
                for name, ckpt in (("straight", straight), ("forked", forked), ("ddp", ddp))}
    assert all(torch.equal(forked["model"][k], v) for k, v in straight["model"].items())
    assert all(torch.equal(momentum["forked"][i], v) for i, v in momentum["straight"].items())
    assert _max_relative_error(straight["model"], ddp["model"]) < 1e-5
    assert _max_relative_error(momentum["straight"], momentum["ddp"]) < 1e-4
    assert straight["optimizer"]["samfast"] == ddp["optimizer"]["samfast"]


@pytest.mark.parametrize("flags, name", [
    ([], "--fsdp"),  # without torchrun
    (["--ddp-ascent", "local"], "--ddp-ascent"), (["--amp", "fp16"], "--amp"),
    (["--sam-policy", "looksam"], "--sam-policy"),
    (["--compile"], "--compile"), (["--sharpness-every", "1"], "--sharpness-every"),
    (["--eval-robust-every", "1"], "--eval-robust-every"), (["--adv-start", "1"], "--adv-start"),
])
def test_trainer_refuses_what_fsdp_does_not_run_naming_the_flag(flags, name, monkeypatch):
    from samfast.cifar.config import ConfigError, config_from_flags

    monkeypatch.setenv("WORLD_SIZE", "1" if name == "--fsdp" else "2")
    with pytest.raises(ConfigError, match=f"argument {name}: .*"):
        config_from_flags(["--fsdp", "--epochs", "2", *flags])
