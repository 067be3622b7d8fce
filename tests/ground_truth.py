"""Independent ground truth for the SAM tests: per-tensor, written from the formulas alone.

Nothing here imports samfast or uses torch.optim: SGD and AdamW are written out by hand, one
tensor at a time, in whatever dtype the caller asks for (float64 for the ground truth; the same
code in a low precision measures what "plain PyTorch at that precision" gets wrong, which is
the yardstick of the flash-attention tolerance rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class GTGroup:
    params: list          # indices into the problem's parameter list
    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.0
    normalize: bool = True
    eps: float = 1e-12
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8


@dataclass
class GroundTruthSAM:
    """SAM + (SGD | AdamW), one tensor at a time."""

    weights: list                      # tensors, modified in place
    groups: list                       # GTGroup
    base: str = "sgd"                  # "sgd" | "adamw"
    state: dict = field(default_factory=dict)

    def _t(self, group: GTGroup, w):
        return w.abs() + group.eta if group.adaptive else torch.ones_like(w)

    def first_step(self, grads: list) -> list:
        """Perturb in place; returns the saved weights."""
        sq = 0.0
        for group in self.groups:
            for i in group.params:
                if grads[i] is not None:
                    sq += float(((self._t(group, self.weights[i]) * grads[i]) ** 2).sum())
        norm = math.sqrt(sq)
        saved = [w.clone() for w in self.weights]
        for group in self.groups:
            for i in group.params:
                g = grads[i]
                if g is None:
                    continue
                scale = group.rho / (norm + group.eps) if group.normalize else group.rho
                t = self._t(group, self.weights[i])
                self.weights[i].copy_(self.weights[i] + scale * t * t * g)
        return saved

    def second_step(self, saved: list, grads: list, lr_factor: float = 1.0) -> None:
        for i, w in enumerate(self.weights):
            w.copy_(saved[i])
        self.base_step(grads, lr_factor)

    def base_step(self, grads: list, lr_factor: float = 1.0) -> None:
        for group in self.groups:
            lr = group.lr * lr_factor
            for i in group.params:
                if grads[i] is not None:
                    (self._sgd if self.base == "sgd" else self._adamw)(group, i, grads[i], lr)

    def _sgd(self, group: GTGroup, i: int, g, lr: float) -> None:
        w = self.weights[i]
        d = g + group.weight_decay * w
        if group.momentum != 0:
            buf = self.state.get(i)
            buf = d.clone() if buf is None else group.momentum * buf + (1 - group.dampening) * d
            self.state[i] = buf
            d = d + group.momentum * buf if group.nesterov else buf
        w.copy_(w - lr * d)

    def _adamw(self, group: GTGroup, i: int, g, lr: float) -> None:
        w = self.weights[i]
        b1, b2 = group.betas
        step, m, v = self.state.get(i, (0, torch.zeros_like(w), torch.zeros_like(w)))
        step += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        self.state[i] = (step, m, v)
        m_hat = m / (1 - b1 ** step)
        v_hat = v / (1 - b2 ** step)
        w.copy_(w * (1 - lr * group.weight_decay) - lr * m_hat / (v_hat.sqrt() + group.adam_eps))
