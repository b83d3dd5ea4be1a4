"""The training recipe and its pieces: settings, precision, the target scaler, loss, fraction jitter, the model.

The recipe (npj paper and original code; docs/model-and-recipe.md): targets standardised with the training
mean and std; fraction jitter; RobustL1 loss; Lamb inside Lookahead; triangular cyclic learning rate
1e-4…6e-3 stepped per batch with a half-cycle of ``epochs_step`` epochs; SWA over the weights at
new validation minima, checked after every batch of every ``2*epochs_step``-th epoch; early stop
after three such epochs without a new minimum; the averaged weights are swapped in at the end.
The loop that runs it is :func:`crabnet.training.loop.fit`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from crabnet.elements import feature_table
from crabnet.training.model import CrabNet, CrabNetConfig


@dataclass
class Recipe:
    """Training settings. Build them with :func:`make_recipe` ("immi" or "npj", docs/model-and-recipe.md)."""

    name: str = "immi"  # which published recipe these settings start from
    epochs: int = 300
    epochs_step: int = 1  # half-cycle of the cyclic LR, in epochs; SWA checks every 2x this
    base_lr: float = 1e-4
    max_lr: float = 6e-3
    jitter: float = 0.02  # fraction noise: frac * (1 + N(0,1) * jitter)
    swa: bool = True
    swa_start: int = 2  # SWA checks start at epoch epochs_step * swa_start - 1
    early_stop: int = 3  # stop after this many SWA epochs in which no batch was averaged (0 = never)
    batch_size: int = 0  # 0 = the recipe's 2^round(log2(n_train)-4) in [128, max_batch_size]
    max_batch_size: int = 4096
    eval_batch_size: int = 4096
    lookahead_alpha: float = 0.5
    lookahead_k: int = 6

    def is_full(self) -> bool:
        """Whether these are exactly the settings of the named recipe (300 epochs, SWA early stop)."""
        return self.name in RECIPES and self == make_recipe(self.name, eval_batch_size=self.eval_batch_size)


# The two published recipes (docs/model-and-recipe.md#the-two-recipes): "npj" gave the published MAEs
# (Wang et al. 2021); "immi" is the default of the explainability paper's scripts (learning rate cycles every 2 epochs).
RECIPES = {"immi": {"epochs_step": 1}, "npj": {"epochs_step": 10}}


def make_recipe(name: str = "immi", **overrides) -> Recipe:
    """The named recipe with some settings replaced (e.g. ``epochs=8`` for a demo)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return Recipe(name=name, **{**RECIPES[name], **overrides})


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> "bf16" where the hardware runs bf16 matmuls natively, else "fp32".

    bf16 is chosen on CUDA GPUs that run it natively (compute capability 8.0 and newer, asked of
    ``device`` itself: :func:`cuda_bf16_native`) and on CPUs with AVX-512 bf16 or AMX tiles (there
    a bf16 matmul ran ~5x faster than fp32 on this project's 2-core machine); other CPUs emulate
    bf16 slowly, so they stay in fp32. Weights, optimiser state and the loss are fp32 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if cuda_bf16_native(device) else "fp32"
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        fast = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return "bf16" if fast else "fp32"
    return "fp32"


def cuda_bf16_native(device: torch.device | str) -> bool:
    """Whether the CUDA device ``device`` (not merely the current one) runs bf16 matmuls natively.

    ``torch.cuda.is_bf16_supported()`` asks about the *current* device and by default also counts
    GPUs that only emulate bf16 (compute capability < 8.0, where it is slower than fp32); here it is
    asked with ``including_emulation=False`` about ``device``. ROCm GPUs count as native, as PyTorch has it.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a PyTorch without the keyword: Ampere (8.0) and newer run bf16 natively
            return torch.version.hip is not None or torch.cuda.get_device_capability(index) >= (8, 0)


def autocast(precision: str, device: torch.device | str):
    """Context for a forward pass at ``precision`` ("fp32" or "bf16"; resolve "auto" first)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Scaler:
    """Standardises targets with the training mean and (unbiased) std."""

    mean: float
    std: float

    @classmethod
    def fit(cls, y: np.ndarray) -> Scaler:
        y = np.asarray(y, dtype=np.float64)
        std = float(y.std(ddof=1)) if len(y) > 1 else 1.0
        return cls(float(y.mean()), std if std > 0 else 1.0)

    def scale(self, y):
        return (y - self.mean) / self.std

    def unscale(self, y):
        return y * self.std + self.mean


def robust_l1(pred: torch.Tensor, log_unc: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RobustL1: sqrt(2)·|ŷ−y|·exp(−log σ) + log σ, averaged."""
    return (math.sqrt(2.0) * (pred - target).abs() * torch.exp(-log_unc) + log_unc).mean()


def jitter_fractions(frac: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """frac·(1 + N(0,1)·scale), clamped to [0, 1], padding kept 0, re-normalised to sum 1."""
    if scale <= 0:
        return frac
    noise = torch.randn(frac.shape, generator=generator, device=frac.device, dtype=frac.dtype)
    out = (frac * (1 + noise * scale)).clamp(0, 1) * (frac > 0)
    return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)


def build_model(features: str = "mat2vec", n_elements: int = 0, **overrides) -> CrabNet:
    """A fresh CrabNet on the given element features (config fields may be overridden)."""
    table, _ = feature_table(features)
    cfg = CrabNetConfig(features=features, d_in=table.shape[1], n_elements=n_elements, **overrides)
    return CrabNet(cfg, table)


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as a plain dict (for checkpoint metadata and store attributes)."""
    return asdict(recipe)
