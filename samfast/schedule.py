"""Switch schedules: which phase (SGD or SAM; standard or adversarial training) is active.

Epochs are counted from 0. A phase given as ``start`` / ``end`` is active for the half-open
range of epochs ``start <= epoch < end`` (``end=None``: until the end of training). So with
``epochs=200``:

* ``SwitchSchedule(200, sam_start=175)`` — epochs 0..174 SGD, 175..199 SAM: 175 SGD epochs
  then 25 SAM epochs, the late switch of Zhou et al. (ICLR 2025), Figure 1;
* ``SwitchSchedule(200, sam_start=0, sam_end=50)`` — SAM for epochs 0..49, then SGD (early SAM);
* ``SwitchSchedule(200, sam_start=None)`` — SGD throughout; ``sam_start=0`` — SAM throughout;
* ``adv_start`` / ``adv_end`` the same for PGD adversarial training.

Applying the schedule to a :class:`samfast.SAM` sets ``opt.sam_enabled``. With
``reset_momentum=True``, the base optimizer's state (momentum buffers) is cleared whenever the
SAM phase switches on or off, which is what the paper's released code does in effect (it builds
a fresh optimizer for each phase). The default keeps the momentum across the switch: the
optimizer state is the same object in both phases, and the switch only changes how the
gradient is taken.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_range(name_start: str, start, name_end: str, end, epochs: int) -> None:
    for name, value in ((name_start, start), (name_end, end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= epochs):
            raise ValueError(f"Invalid {name}: {value!r} (must be an epoch in 0..{epochs})")
    if end is not None and start is None:
        raise ValueError(f"Invalid {name_end}: {end} given without {name_start}")
    if start is not None and end is not None and end < start:
        raise ValueError(f"Invalid {name_end}: {end} < {name_start} = {start}")


@dataclass(frozen=True)
class SwitchSchedule:
    epochs: int
    sam_start: int | None = 0
    sam_end: int | None = None
    adv_start: int | None = None
    adv_end: int | None = None
    reset_momentum: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"Invalid epochs: {self.epochs!r} (must be an int >= 1)")
        _check_range("sam_start", self.sam_start, "sam_end", self.sam_end, self.epochs)
        _check_range("adv_start", self.adv_start, "adv_end", self.adv_end, self.epochs)

    @staticmethod
    def _active(epoch: int, start, end) -> bool:
        return start is not None and start <= epoch < (end if end is not None else float("inf"))

    def sam_at(self, epoch: int) -> bool:
        """Is SAM on during ``epoch`` (0-based)?"""
        return self._active(epoch, self.sam_start, self.sam_end)

    def adversarial_at(self, epoch: int) -> bool:
        """Is adversarial training on during ``epoch`` (0-based)?"""
        return self._active(epoch, self.adv_start, self.adv_end)

    def phase(self, epoch: int) -> str:
        """A short name for the epoch's phase: "sgd", "sam", "sgd+adv" or "sam+adv"."""
        return ("sam" if self.sam_at(epoch) else "sgd") + ("+adv" if self.adversarial_at(epoch)
                                                           else "")

    @property
    def sam_epochs(self) -> int:
        return sum(self.sam_at(e) for e in range(self.epochs))

    @property
    def adversarial_epochs(self) -> int:
        return sum(self.adversarial_at(e) for e in range(self.epochs))

    def switches_at(self, epoch: int) -> bool:
        """Does the SAM phase differ between ``epoch - 1`` and ``epoch``?"""
        return epoch > 0 and self.sam_at(epoch) != self.sam_at(epoch - 1)

    def apply(self, optimizer, epoch: int) -> bool:
        """Set ``optimizer.sam_enabled`` for ``epoch``; with ``reset_momentum``, clear the base
        optimizer's state at a switch. Returns whether SAM is on."""
        on = self.sam_at(epoch)
        if self.reset_momentum and self.switches_at(epoch):
            optimizer.reset_base_state()
        optimizer.sam_enabled = on
        return on
