"""Optimisation pieces of the CrabNet recipe: Lamb, Lookahead, SWA and the cyclic learning rate.

- ``Lamb``: Adam-style moments without bias correction; each tensor's step is scaled by the
  trust ratio clamp(||w||, 0, 10) / ||step|| (1 when either norm is 0).
- ``Lookahead``: every ``k`` steps the slow weights move ``alpha`` of the way to the fast weights
  and the fast weights are reset to them.
- ``SWA``: a running average of the weights, updated only when the validation error reaches a new
  minimum; swapped into the model at the end of training.
- ``triangular_lr``: the triangular cyclic schedule, stepped per batch.
"""

from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (You et al. 2019), as used by CrabNet."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_weight_norm: float = 10.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_weight_norm=max_weight_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    step.add_(p, alpha=group["weight_decay"])
                w_norm = p.norm().clamp(0, group["max_weight_norm"])
                s_norm = step.norm()
                trust = torch.where((w_norm > 0) & (s_norm > 0), w_norm / s_norm, torch.ones_like(w_norm))
                p.add_(step * trust, alpha=-group["lr"])
        return loss


class Lookahead:
    """Lookahead wrapper (Zhang et al. 2019) around another optimizer."""

    def __init__(self, base: torch.optim.Optimizer, alpha: float = 0.5, k: int = 6):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.base = base
        self.alpha = alpha
        self.k = k
        self.counter = 0
        self.slow = [[p.detach().clone() for p in g["params"]] for g in base.param_groups]

    @property
    def param_groups(self):
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.base.step()
        self.counter += 1
        if self.counter % self.k:
            return
        for group, slow in zip(self.base.param_groups, self.slow):
            for p, s in zip(group["params"], slow):
                s.add_(p - s, alpha=self.alpha)
                p.copy_(s)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "counter": self.counter,
                "slow": [[s.clone() for s in g] for g in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.counter = int(state["counter"])
        with torch.no_grad():
            for dst, src in zip(self.slow, state["slow"]):
                for d, s in zip(dst, src):
                    d.copy_(s)


class SWA:
    """Stochastic weight averaging over the weights seen at new validation minima."""

    def __init__(self, params):
        self.params = [p for p in params]
        self.avg = [torch.zeros_like(p) for p in self.params]
        self.n_averaged = 0
        self.best = float("inf")

    @torch.no_grad()
    def update(self, val_error: float) -> bool:
        """Add the current weights to the average if ``val_error`` is a new minimum."""
        if not val_error < self.best:
            return False
        self.best = float(val_error)
        self.n_averaged += 1
        for a, p in zip(self.avg, self.params):
            a.add_(p - a, alpha=1.0 / self.n_averaged)
        return True

    @torch.no_grad()
    def swap(self) -> bool:
        """Put the averaged weights into the model (and the live ones into the buffer)."""
        if self.n_averaged == 0:
            return False
        for a, p in zip(self.avg, self.params):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)
        return True

    def state_dict(self) -> dict:
        return {"avg": [a.clone() for a in self.avg], "n_averaged": self.n_averaged, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, s in zip(self.avg, state["avg"]):
                a.copy_(s)
        self.n_averaged = int(state["n_averaged"])
        self.best = float(state["best"])


def triangular_lr(iteration: int, base_lr: float, max_lr: float, half_cycle: int) -> float:
    """Triangular cyclic learning rate at batch ``iteration`` (0-based), half-cycle in batches."""
    cycle = iteration // (2 * half_cycle)
    x = abs(iteration / half_cycle - 2 * cycle - 1)
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x)
