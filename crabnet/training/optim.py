"""Optimisation pieces of the CrabNet recipe: Lamb, Lookahead, the CrabNet SWA scheme, the cyclic LR.

- ``Lamb``: Adam-style moments without bias correction; each tensor's step is scaled by the
  trust ratio clamp(||w||, 0, 10) / ||step|| (1 when either norm is 0). The moments and the Adam
  direction come from PyTorch's fused Adam kernel where it applies (one pass over memory; checked
  against the foreach path once per device type, :func:`fused_adam_probe`), else from
  ``torch._foreach_*`` kernels; the update is one foreach pass for all tensors of a group.
- ``Lookahead``: every ``k`` steps the slow weights move ``alpha`` of the way to the fast weights
  and the fast weights are reset to them. As in the original code the slow copy is made at the
  *first* sync from the fast weights of that moment, so the first sync changes nothing.
- ``SWA``: the CrabNet averaging rule (docs/model-and-recipe.md#the-swa-rule): below 98 % of the last reset
  level the average restarts from the current weights, and every weight set within 1 % of the best validation error
  is added with decay (1/(n+1))^(1/3).
- ``triangular_lr``: the triangular cyclic schedule, stepped per batch.
"""

from __future__ import annotations

import warnings

import torch


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (You et al. 2019), as used by CrabNet."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_weight_norm: float = 10.0,
        fused: bool = True,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_weight_norm": max_weight_norm,
        }
        super().__init__(params, defaults)
        self.fused = fused  # use PyTorch's fused Adam kernel for the moments where it applies
        self._bufs: dict[torch.Tensor, torch.Tensor] = {}  # scratch per parameter, kept between steps
        self._counts: dict[torch.device, list[torch.Tensor]] = {}  # the fused kernel's step counts

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            steps = self._step_buffers(params)
            self._adam_direction(group, params, grads, m, v, steps)  # steps = m / (sqrt(v) + eps)
            if group["weight_decay"]:
                torch._foreach_add_(steps, params, alpha=group["weight_decay"])
            w_norm = _norms(params).clamp(0, group["max_weight_norm"])  # (n,)
            s_norm = _norms(steps)  # (n,)
            trust = torch.where((w_norm > 0) & (s_norm > 0), w_norm / s_norm, torch.ones_like(w_norm))
            # w -= lr * trust * step in one pass per tensor (a 0-dim factor each, no host sync). Also on
            # CUDA: torch 2.13 has no multi-tensor kernel for a per-tensor factor held on the device (its
            # fast path needs equal shapes in every list; the ScalarList/Tensor-scalars overloads take
            # host numbers, i.e. a synchronisation per step), so this stays one launch per tensor.
            torch._foreach_addcmul_(params, steps, list((trust * -group["lr"]).unbind()))
        return loss

    def _adam_direction(self, group: dict, params, grads, m, v, steps) -> None:
        """Update the moments in place and write m / (sqrt(v) + eps) into ``steps``.

        Where PyTorch has its fused Adam kernel for these tensors, it does all of this in one pass
        over memory (the separate operations took ~3x longer on the CPU): told that the step count
        is 1e9 (bias corrections 1 - beta^t = 1 exactly), learning rate -1 and decoupled weight
        decay -1, it first sets each step buffer to s * (1 - (-1)(-1)) = 0 and then adds
        m / (sqrt(v) + eps) to it. The buffers start at 0, so they never hold inf or NaN of their own.
        """
        beta1, beta2 = group["betas"]
        if self._fused_ok(params, grads, beta1, beta2):
            counts = self._counts.get(params[0].device)
            if counts is None or len(counts) != len(params):
                counts = self._counts[params[0].device] = _fused_counts(len(params), params[0].device)
            _fused_adam_direction(grads, m, v, steps, counts, beta1, beta2, group["eps"])
            return
        _foreach_adam_direction(grads, m, v, steps, beta1, beta2, group["eps"])

    def _fused_ok(self, params, grads, beta1: float, beta2: float) -> bool:
        """Whether the fused kernel can stand in for the formula here (see ``_adam_direction``).

        The first time on a device type the kernel is also checked against the foreach path on a
        small probe (:func:`fused_adam_probe`); where it differs or raises, Lamb warns once and keeps
        to the foreach path on that device type.
        """
        if not self.fused or not hasattr(torch, "_fused_adamw_"):
            return False
        if any(1.0 - b**1e9 != 1.0 for b in (beta1, beta2)):  # bias correction would not be exactly 1
            return False
        dev = params[0].device
        return (
            dev.type in ("cpu", "cuda")
            and all(t.device == dev and t.dtype == torch.float32 and t.is_contiguous() for t in (*params, *grads))
            and _fused_verified(dev, beta1, beta2)
        )

    def _step_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scratch tensors for the update, one per parameter, kept between steps (not saved).

        A fresh multi-megabyte tensor per step costs page faults that took longer than the
        arithmetic itself on the CPU. They start at 0 (the fused path relies on finite values).
        """
        out = []
        for p in params:
            b = self._bufs.get(p)
            if b is None or b.shape != p.shape or b.device != p.device:
                b = self._bufs[p] = torch.zeros_like(p)
            out.append(b)
        return out


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of each tensor, (n,). On the CPU a dot product per tensor (half the time of
    ``torch._foreach_norm`` there); on CUDA ``torch._foreach_norm``, a few multi-tensor kernels
    instead of one launch per tensor."""
    if tensors[0].device.type == "cuda" and hasattr(torch, "_foreach_norm"):
        return torch.stack(torch._foreach_norm(tensors))
    return torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).sqrt()


def _foreach_adam_direction(
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    steps: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Moments updated in place, ``steps`` = m / (sqrt(v) + eps), with ``torch._foreach_*`` kernels."""
    torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    for vi, si in zip(v, steps):
        torch.sqrt(vi, out=si)
    torch._foreach_add_(steps, eps)
    for mi, si in zip(m, steps):
        torch.div(mi, si, out=si)


def _fused_counts(n: int, device: torch.device) -> list[torch.Tensor]:
    """The fused kernel's step counts: 1e9, so that its bias corrections 1 - beta^t are exactly 1."""
    return [torch.full((), 1e9, device=device) for _ in range(n)]


def _fused_adam_direction(
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    steps: list[torch.Tensor],
    counts: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """What :func:`_foreach_adam_direction` does, in PyTorch's fused Adam kernel (``Lamb._adam_direction``)."""
    torch._fused_adamw_(
        steps,
        grads,
        m,
        v,
        [],
        counts,
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=-1.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


# device type -> whether torch._fused_adamw_ passed fused_adam_probe there (checked once per process)
_FUSED_VERDICT: dict[str, bool] = {}
FUSED_PROBE_RTOL, FUSED_PROBE_ATOL = 1e-5, 1e-6  # allowed difference from the foreach path


def fused_adam_probe(device: torch.device | str, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6) -> dict:
    """Check Lamb's use of ``torch._fused_adamw_`` against the foreach path on ``device``.

    A few tiny tensors (one 0-dim) with the same gradients and moments go through both paths; the
    step buffers start with stale values, which the fused path must clear. Runs without autograd.

    Returns:
        ``{"ok": bool, "max_abs_diff": float | None, "error": str | None}``: ok when every moment and
        step agrees within rtol 1e-5 / atol 1e-6 and the kernel did not raise.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2), ()]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    m0 = [(0.1 * torch.randn(s, generator=g)).to(device) for s in shapes]
    v0 = [(0.01 * torch.rand(s, generator=g)).to(device) for s in shapes]
    stale = [torch.randn(s, generator=g).to(device) for s in shapes]  # left in the buffers by a previous step
    ref = ([t.clone() for t in m0], [t.clone() for t in v0], [t.clone() for t in stale])
    out = ([t.clone() for t in m0], [t.clone() for t in v0], [t.clone() for t in stale])
    try:
        with torch.no_grad():
            _foreach_adam_direction(grads, *ref, beta1, beta2, eps)
            _fused_adam_direction(grads, *out, _fused_counts(len(shapes), device), beta1, beta2, eps)
        pairs = [(a, b) for xs, ys in zip(out, ref) for a, b in zip(xs, ys)]
        diff = max(float((a - b).abs().max()) for a, b in pairs)
        ok = all(torch.allclose(a, b, rtol=FUSED_PROBE_RTOL, atol=FUSED_PROBE_ATOL) for a, b in pairs)
    except Exception as err:
        return {"ok": False, "max_abs_diff": None, "error": f"{type(err).__name__}: {err}"}
    return {"ok": ok, "max_abs_diff": diff, "error": None}


def _fused_verified(device: torch.device, beta1: float, beta2: float) -> bool:
    """Whether the fused kernel passed :func:`fused_adam_probe` on this device type (probed once)."""
    verdict = _FUSED_VERDICT.get(device.type)
    if verdict is None:
        result = fused_adam_probe(device, beta1, beta2)
        verdict = _FUSED_VERDICT[device.type] = bool(result["ok"])
        if not verdict:
            why = result["error"] or f"differs from the foreach path by up to {result['max_abs_diff']:.3g}"
            warnings.warn(
                f"Lamb: torch._fused_adamw_ on {device.type}: {why}; using the foreach path instead",
                RuntimeWarning,
                stacklevel=4,
            )
    return verdict


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
        self.slow: list[list[torch.Tensor]] | None = None  # made at the first sync

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
        if self.slow is None:  # first sync: slow = fast, so nothing moves
            self.slow = [[p.detach().clone() for p in g["params"]] for g in self.base.param_groups]
            return
        for group, slow in zip(self.base.param_groups, self.slow):
            fast = list(group["params"])
            torch._foreach_lerp_(slow, fast, self.alpha)  # slow += alpha * (fast - slow)
            torch._foreach_copy_(fast, slow)

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "counter": self.counter,
            "slow": [] if self.slow is None else [[s.clone() for s in g] for g in self.slow],
        }

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.counter = int(state["counter"])
        device = self.base.param_groups[0]["params"][0].device
        self.slow = [[s.to(device).clone() for s in g] for g in state["slow"]] or None


class SWA:
    """The CrabNet stochastic weight averaging rule (original ``SWA.update_swa``; docs/model-and-recipe.md).

    ``update(m)`` is called with the validation error m of the current weights:

    1. m < 0.98 * maximum: reset, and add the current weights at once: avg = w, n_averaged = 1
       (the original zeroes its buffer and then falls through to its addition), maximum = m;
    2. m < minimum: minimum = m;
    3. m <= 1.01 * minimum: the weights enter the average with decay d = (1/(n+1))^(1/3):
       avg += (w - avg) * d, n += 1 (the first addition copies w); ``update`` returns True.
       After a reset that also passes this test the same weights are in twice (n = 2), so the
       next addition has decay (1/3)^(1/3). Only this step marks a minimum found.

    ``minimum`` and ``maximum`` start at 1e9.
    """

    RESET_BELOW = 0.98
    BAND = 1.01
    RULE = 2  # 2: a reset adds the current weights at once, as the original does (1: it only reset the count)

    def __init__(self, params):
        self.params = list(params)
        self.avg = [torch.zeros_like(p) for p in self.params]
        self.n_averaged = 0
        self.minimum = 1e9
        self.maximum = 1e9
        self.resets = 0

    @torch.no_grad()
    def update(self, val_error: float) -> bool:
        """Apply the rule for validation error ``val_error``; True if the weights were averaged."""
        m = float(val_error)
        if m < self.RESET_BELOW * self.maximum:
            self.n_averaged = 0
            self._add()  # decay 1: the average restarts as a copy of the current weights
            self.maximum = m
            self.resets += 1
        if m < self.minimum:
            self.minimum = m
        if not m <= self.BAND * self.minimum:
            return False
        self._add()
        return True

    def _add(self) -> None:
        """avg += (w - avg) * (1/(n+1))^(1/3); n += 1."""
        decay = (1.0 / (self.n_averaged + 1)) ** (1.0 / 3.0)
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], decay)
        self.n_averaged += 1

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
        return {
            "avg": [a.clone() for a in self.avg],
            "n_averaged": self.n_averaged,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "resets": self.resets,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, s in zip(self.avg, state["avg"]):
                a.copy_(s)
        self.n_averaged = int(state["n_averaged"])
        self.minimum = float(state["minimum"])
        self.maximum = float(state["maximum"])
        self.resets = int(state["resets"])


def triangular_lr(iteration: int, base_lr: float, max_lr: float, half_cycle: int) -> float:
    """Triangular cyclic learning rate at batch ``iteration`` (0-based), half-cycle in batches."""
    cycle = iteration // (2 * half_cycle)
    x = abs(iteration / half_cycle - 2 * cycle - 1)
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x)
