"""SwitchSchedule: 0-based epochs, half-open [start, end) phases, validation, application."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samfast
from samfast import SwitchSchedule


def test_late_switch_of_figure_1():
    s = SwitchSchedule(200, sam_start=175)
    assert [s.sam_at(e) for e in (0, 174, 175, 199)] == [False, False, True, True]
    assert s.sam_epochs == 25
    assert [s.phase(e) for e in (174, 175)] == ["sgd", "sam"]
    assert [e for e in range(200) if s.switches_at(e)] == [175]


def test_early_sam_full_sam_and_sgd_only():
    early = SwitchSchedule(10, sam_start=0, sam_end=3)
    assert [early.sam_at(e) for e in range(10)] == [True] * 3 + [False] * 7
    assert [e for e in range(10) if early.switches_at(e)] == [3]
    assert SwitchSchedule(10, sam_start=0).sam_epochs == 10
    assert SwitchSchedule(10, sam_start=None).sam_epochs == 0
    assert SwitchSchedule(10, sam_start=10).sam_epochs == 0  # start == epochs: never


def test_adversarial_phase_combines_with_sam():
    s = SwitchSchedule(8, sam_start=6, adv_start=4, adv_end=7)
    assert [s.phase(e) for e in range(8)] == ["sgd"] * 4 + ["sgd+adv"] * 2 + ["sam+adv", "sam"]
    assert s.adversarial_epochs == 3


@pytest.mark.parametrize("kwargs, name", [
    (dict(epochs=0), "epochs"), (dict(epochs=5, sam_start=6), "sam_start"),
    (dict(epochs=5, sam_start=-1), "sam_start"), (dict(epochs=5, sam_start=3, sam_end=2), "sam_end"),
    (dict(epochs=5, sam_start=None, sam_end=2), "sam_end"), (dict(epochs=5, adv_start=9), "adv_start"),
    (dict(epochs=5, sam_start=1.5), "sam_start"),
])
def test_invalid_schedules_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SwitchSchedule(**kwargs)


def _trained_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = samfast.SAM(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.second_step(zero_grad=True)
    return model, opt


@pytest.mark.parametrize("reset", [False, True])
def test_apply_sets_sam_enabled_and_resets_momentum_only_at_a_switch(reset):
    model, opt = _trained_optimizer()
    s = SwitchSchedule(4, sam_start=2, reset_momentum=reset)
    buf = opt.state[model.weight]["momentum_buffer"].clone()
    assert s.apply(opt, 1) is False and opt.sam_enabled is False
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], buf)  # no switch at 1
    assert s.apply(opt, 2) is True and opt.sam_enabled is True
    assert ("momentum_buffer" not in opt.state[model.weight]) == reset
    model(torch.randn(3, 4)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.second_step(zero_grad=True)
    assert "momentum_buffer" in opt.state[model.weight]  # started anew after a reset
