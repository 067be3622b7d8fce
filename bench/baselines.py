"""The SAM implementations people use today, written here from their published algorithm.

``LoopSAM`` is the per-tensor Python loop of the most used PyTorch SAM (davda54/sam): a norm
per tensor, then a clone + add per tensor for the ascent, and ``p.data = old_p`` per tensor
before the base step. ``ForeachSAM`` is the same algorithm with ``torch._foreach_*`` calls.
Neither skips non-finite steps or handles mixed devices; they are timing baselines only.
"""

from __future__ import annotations

import torch


class LoopSAM:
    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False,
                 **kwargs) -> None:
        self.params = [p for p in params]
        self.rho, self.adaptive = rho, adaptive
        self.base_optimizer = base_optimizer(self.params, **kwargs)
        self.old_p: dict = {}

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        device = self.params[0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2).to(device)
            for p in self.params if p.grad is not None]), p=2)

    @torch.no_grad()
    def first_step(self) -> None:
        scale = self.rho / (self._grad_norm() + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.old_p[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.old_p[p]
        self.base_optimizer.step()


class ForeachSAM(LoopSAM):
    @torch.no_grad()
    def first_step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.old = [p.detach().clone() for p in params]
        torch._foreach_add_([p.detach() for p in params],
                            torch._foreach_mul(grads, self.rho / (norm + 1e-12)))

    @torch.no_grad()
    def second_step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        torch._foreach_copy_([p.detach() for p in params], self.old)
        self.base_optimizer.step()
