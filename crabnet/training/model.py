"""The CrabNet model (Wang, Kauwe, Murdock, Sparks, npj Comput. Mater. 7 (2021) 77).

A compound is a sequence of its elements: each element is embedded from a frozen element feature
table, its fraction is added as two sinusoidal encodings (linear and log scale), and a stack of
transformer encoder layers lets the elements attend to one another. A residual network maps each
element to (value, logit, log-uncertainty); the compound's output is the mean over its real
elements, and its prediction is value * sigmoid(logit).

Per-head attention weights of every layer are available on demand (``capture=True``) without
patching PyTorch: the layer output always comes from the same attention computation (written out
on the CPU, PyTorch's fused ``scaled_dot_product_attention`` elsewhere), and the weights are
computed beside it (softmax in float32) only when asked for, so capturing changes nothing in the
predictions.

Shapes: B compounds, E element slots (0-padded), D = d_model, H heads, L layers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CrabNetConfig:
    """Model settings; stored in every checkpoint."""

    features: str = "mat2vec"  # element feature table (crabnet.elements.FEATURE_NAMES)
    d_in: int = 200  # width of the feature table
    d_model: int = 512
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 2048
    dropout: float = 0.1
    resolution: int = 5000  # rows of the fractional-encoding tables
    frac_base: float = 50.0  # base of the sin/cos frequencies (10000 in the original transformer)
    head_dims: tuple[int, ...] = (1024, 512, 256, 128)
    n_out: int = 3  # value, logit, log-uncertainty
    n_elements: int = 0  # element-axis width seen in training (information; inputs may be wider)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_dims"] = list(self.head_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CrabNetConfig:
        d = dict(d)
        d["head_dims"] = tuple(d.get("head_dims", cls.head_dims))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class FractionalEncoder(nn.Module):
    """Sinusoidal encoding of element fractions, from a table of ``resolution`` rows.

    Linear: row round(x * resolution) - 1 with x clamped to >= 1/resolution.
    Log: x' = 0.0025 * log2(x)^2 clamped to <= 1, then the same lookup.
    """

    def __init__(self, d: int, resolution: int = 5000, base: float = 50.0, log: bool = False):
        super().__init__()
        self.resolution = resolution
        self.log = log
        pos = torch.arange(resolution, dtype=torch.float64).unsqueeze(1)  # (R, 1); float64 for large angles
        i = torch.arange(d, dtype=torch.float64).unsqueeze(0)  # (1, d)
        angle = pos / base ** (2 * i / d)  # (R, d); even channels sin, odd channels cos
        table = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
        self.register_buffer("table", table.float(), persistent=False)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Row index into the table for fractions ``x`` (any shape)."""
        if self.log:
            x = (0.0025 * torch.log2(x) ** 2).clamp(max=1.0)  # log2(0) = -inf -> clamped to 1
        x = x.clamp(min=1.0 / self.resolution)
        return (torch.round(x * self.resolution) - 1).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, E) -> (B, E, d)
        return self.table[self.index(x)]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on the CPU with a mask drawn from 16-bit random integers.

    ``torch.bernoulli_`` draws one float per element and dominated the CPU training step; here
    numpy's PCG64 generator gives four 16-bit integers per 64-bit draw (seeded from PyTorch's
    generator, so runs stay reproducible and resumable from ``torch.get_rng_state``). The drop
    rate is round(p * 2^16) / 2^16 (0.1 -> 0.1000061). On other devices PyTorch's fused dropout.
    """
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    n = x.numel()
    seed = int(torch.randint(2**62, ()))
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]  # (n,) uniform 16-bit
    keep = bits >= round(p * 65536)  # (n,) True with probability 1 - p
    # The mask holds 1/(1-p) where kept and 0 elsewhere, built in numpy as the integer bit pattern
    # of x's dtype (no bfloat16 in numpy): one pass instead of a cast and a multiplication.
    scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype).view(_SAME_WIDTH_INT[x.element_size()]).numpy()
    mask = keep.astype(scale.dtype)
    mask *= scale
    return x * torch.from_numpy(mask).view(x.dtype).view(x.shape)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes -> integer dtype


# Under bf16 autocast on the CPU every new matrix shape makes oneDNN build (and cache) a new kernel,
# which cost more than the matmul itself when each batch had its own number of real elements; the
# real rows are therefore padded with zero rows to a multiple of this many (a few shapes in all).
ROW_BUCKET = 64


def real_slots(elements: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices (N,) of the real slots (atomic number > 0) of a (B, E) batch, for ``forward(real=...)``.

    Computed on the host from the batch's numpy rows before they reach the device, and sent there
    without waiting (from pinned memory on CUDA), so the forward pass needs no host synchronisation
    to find them.
    """
    idx = torch.from_numpy(np.flatnonzero(np.asarray(elements) > 0))  # (N,) int64
    device = torch.device(device)
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def sum_slots(values: torch.Tensor, real: torch.Tensor, B: int, E: int, ordered: bool = False) -> torch.Tensor:
    """Per-compound sums (B, C) of the values (N, C) of the real slots ``real`` (flat indices into B x E).

    ``ordered``: scatter into the padded (B*E, C) layout and sum there, instead of ``index_add``,
    whose atomic additions on a GPU make the order of the sum (and its last bits) vary from run to
    run. The CPU keeps ``index_add`` (sequential there).
    """
    if ordered:
        return values.new_zeros(B * E, values.shape[1]).index_copy(0, real, values).view(B, E, -1).sum(1)
    return values.new_zeros(B, values.shape[1]).index_add(0, real // E, values)


def _slots_on_host(device: torch.device) -> bool:
    """Whether the forward pass finds the real slots itself (``all()``/``nonzero()`` wait for the device;
    on the CPU that costs nothing)."""
    return device.type == "cpu"


def gather_rows(x: torch.Tensor, real: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """Rows ``real`` of ``x`` (M, D) -> (N, D), then zero rows up to a multiple of ``multiple``."""
    xr = x.index_select(0, real)
    extra = -len(real) % multiple
    return F.pad(xr, (0, 0, 0, extra)) if extra else xr


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, p: float, fused: bool
) -> torch.Tensor:
    """softmax(q kᵀ / √Dh, masked) with dropout ``p``, times v: 3 x (B, H, E, Dh) -> (B, H, E, Dh).

    ``fused``: PyTorch's ``scaled_dot_product_attention`` (used off the CPU). On the CPU it is
    written out: with a handful of elements per compound the fused kernels spent their time on
    copies (training) and tiling (inference); the softmax is then taken in float32.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
    return dropout(attention_weights(q, k, attn_mask), p, p > 0).to(v.dtype) @ v


def attention_weights(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √Dh) over the keys ``attn_mask`` lets through: (B, H, E, Dh) x 2 -> (B, H, E, E).

    The softmax is taken in float32 (the q kᵀ matmul itself follows autocast).
    """
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, H, E, E)
    return torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameter layout of ``nn.MultiheadAttention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = n_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[Q|K|V] = x W_in^T + b_in, not split by head, not scaled: (B, E, D) -> (B, E, 3D)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, E, D = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(B, E, 3, h, D // h).permute(2, 0, 3, 1, 4)  # 3 x (B, H, E, Dh)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, E): True where the key is a real element
        y = attend(q, k, v, attn_mask, self.dropout if self.training else 0.0, fused=x.device.type != "cpu")
        weights = None
        if need_weights:  # on the CPU the very weights the layer used (before dropout)
            with torch.no_grad():
                weights = attention_weights(q, k, attn_mask) * keep[:, None, :, None]  # padding query rows -> 0
        y = y.transpose(1, 2).reshape(B, E, D)
        return self.out_proj(y), weights


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer encoder layer (ReLU feed-forward)."""

    def __init__(self, cfg: CrabNetConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.p = cfg.dropout

    def forward(self, x, keep, need_weights=False, real=None, bucket=1):  # (B, E, D) -> (B, E, D), (B, H, E, E)?
        """``real``: flat indices of the real element slots; the feed-forward block then runs on them
        only (padded with zero rows to a multiple of ``bucket``, whose results are dropped)."""
        a, w = self.self_attn(x, keep, need_weights)
        x = self.norm1(x + dropout(a, self.p, self.training))
        if real is None:
            return self._feed_forward(x), w
        B, E, D = x.shape
        xr = self._feed_forward(gather_rows(x.reshape(B * E, D), real, bucket))[: len(real)]  # (N, D): real slots
        return xr.new_zeros(B * E, D).index_copy(0, real, xr).view(B, E, D), w  # padding rows 0

    def _feed_forward(self, x):  # (..., D) -> (..., D)
        f = self.linear2(dropout(F.relu(self.linear1(x), inplace=True), self.p, self.training))
        return self.norm2(x + dropout(f, self.p, self.training))


class ResidualHead(nn.Module):
    """512 -> 1024 -> 512 -> 256 -> 128 -> n_out with LeakyReLU blocks and linear shortcuts."""

    def __init__(self, d_model: int, dims: tuple[int, ...], n_out: int):
        super().__init__()
        widths = (d_model, *dims)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.shortcuts = nn.ModuleList(
            nn.Linear(a, b, bias=False) if a != b else nn.Identity() for a, b in zip(widths[:-1], widths[1:])
        )
        self.act = nn.LeakyReLU()
        self.fc_out = nn.Linear(widths[-1], n_out)

    def forward(self, x):  # (B, E, D) -> (B, E, n_out)
        for fc, sc in zip(self.fcs, self.shortcuts):
            x = self.act(fc(x)) + sc(x)
        return self.fc_out(x)


@dataclass
class Internals:
    """What a forward pass can return besides the output.

    Attributes:
        output: (B, 3) raw compound output (value*sigmoid(logit), logit, log-uncertainty).
        attention: (B, L, H, E, E) per-head attention weights, or None.
        hidden: list of L+1 tensors (B, E, D): the input of each layer, then the encoder output
            (padding rows zeroed in the last), or None.
    """

    output: torch.Tensor
    attention: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = field(default=None)


class CrabNet(nn.Module):
    """CrabNet. ``forward(elements, fractions)`` -> (B, 3) = (prediction, logit, log-uncertainty)."""

    def __init__(self, cfg: CrabNetConfig, feature_table: np.ndarray | torch.Tensor):
        super().__init__()
        assert cfg.d_model % 2 == 0, "d_model must be even (two fractional encoders of d_model/2)"
        self.cfg = cfg
        table = torch.as_tensor(np.asarray(feature_table), dtype=torch.float32)
        assert table.shape[1] == cfg.d_in, f"feature table has {table.shape[1]} columns, config says {cfg.d_in}"
        self.register_buffer("feature_table", table)  # (119, d_in), frozen; row 0 = padding
        self.embed = nn.Linear(cfg.d_in, cfg.d_model)
        self.emb_scale = nn.Parameter(torch.tensor(1.0))  # embedding multiplied by 2^s
        half = cfg.d_model // 2
        self.frac_linear = FractionalEncoder(half, cfg.resolution, cfg.frac_base, log=False)
        self.frac_log = FractionalEncoder(half, cfg.resolution, cfg.frac_base, log=True)
        self.frac_scale = nn.Parameter(torch.tensor(1.0))  # linear encoding * 2^((1-p)^2)
        self.frac_log_scale = nn.Parameter(torch.tensor(1.0))  # log encoding * 2^((1-p)^2)
        layer = EncoderLayer(cfg)  # one layer initialised, then copied: the layers start identical
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(cfg.n_layers))
        self.head = ResidualHead(cfg.d_model, cfg.head_dims, cfg.n_out)

    def n_params(self) -> int:
        """Trainable parameters (the frozen feature table is a buffer, not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def encode_input(self, elements: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """Input of the first encoder layer: (B, E), (B, E) -> (B, E, D)."""
        x = self.embed(self.feature_table[elements]) * 2**self.emb_scale  # (B, E, D)
        pe = self.frac_linear(fractions) * 2 ** ((1 - self.frac_scale) ** 2)  # (B, E, D/2)
        ple = self.frac_log(fractions) * 2 ** ((1 - self.frac_log_scale) ** 2)  # (B, E, D/2)
        return x + torch.cat([pe, ple], dim=-1)  # linear in [0, D/2), log in [D/2, D)

    def forward_internals(
        self,
        elements: torch.Tensor,
        fractions: torch.Tensor,
        *,
        attention: bool = False,
        hidden: bool = False,
        real: torch.Tensor | None = None,
    ) -> Internals:
        """Forward pass returning the output and, on request, attention maps and layer inputs.

        Args:
            elements: (B, E) atomic numbers, 0 = padding.
            fractions: (B, E) fractions, 0 at padding.
            attention: also return per-head attention weights of every layer.
            hidden: also return the input of every layer and the encoder output.
            real: (N,) flat indices of the real slots on ``elements``' device (:func:`real_slots`), if
                the caller knows them; the same result as without.
        """
        keep = elements > 0  # (B, E)
        B, E = keep.shape
        # Per-element work (feed-forward blocks, output head) runs on the real slots only when there
        # is padding; attention needs the padded (B, E) layout. Real slots get the same result either
        # way (padding keys are masked), padding rows are 0 instead of unused values. Finding the real
        # slots takes two host synchronisations (all(), nonzero()): free on the CPU, which keeps this
        # path (running every slot instead took 1.7x (fp32) and 1.45x (bf16) as long per training
        # step on aflow__Egap, 39 % of whose slots are real, batch 256), but on a GPU they would stall
        # the queue of kernels every step. Off the CPU the slots therefore come from the caller
        # (``real``: fit() and the validation passes find them in the batch's numpy rows), else the
        # per-element work runs on all B*E slots with the padding masked out of the pooled output
        # (no synchronisation).
        padded = False  # per-element work on every slot, padding masked out of the pooled output
        if real is not None:
            real = None if len(real) == B * E else real  # (N,); all slots real: nothing to gather
        elif _slots_on_host(elements.device):
            real = keep.reshape(-1).nonzero().squeeze(1) if not bool(keep.all()) else None  # (N,)
        else:
            padded = True
        bucket = ROW_BUCKET if torch.is_autocast_enabled(elements.device.type) else 1
        x = self.encode_input(elements, fractions)
        maps, inputs = [], []
        for layer in self.layers:
            if hidden:
                inputs.append(x)
            x, w = layer(x, keep, need_weights=attention, real=real, bucket=bucket)
            if attention:
                maps.append(w)
        x = x * keep.unsqueeze(-1)  # padding rows zeroed after the encoder
        if hidden:
            inputs.append(x)
        if real is None:
            out_e = self.head(x).float()  # (B, E, 3); pooled in float32 also under autocast
            out = (out_e * keep.unsqueeze(-1)).sum(1) if padded else out_e.sum(1)  # (B, 3)
        else:
            out_r = self.head(gather_rows(x.reshape(B * E, -1), real, bucket))[: len(real)].float()  # (N, 3)
            out = sum_slots(out_r, real, B, E, ordered=elements.device.type != "cpu")  # (B, 3)
        out = out / keep.sum(1, keepdim=True)  # mean over real elements
        value, logit, log_unc = out.unbind(-1)
        out = torch.stack([value * torch.sigmoid(logit), logit, log_unc], dim=-1)
        return Internals(out, torch.stack(maps, dim=1) if attention else None, inputs if hidden else None)

    def forward(
        self, elements: torch.Tensor, fractions: torch.Tensor, real: torch.Tensor | None = None
    ) -> torch.Tensor:  # -> (B, 3)
        """(B, E), (B, E) -> (B, 3); ``real``: see :meth:`forward_internals`."""
        return self.forward_internals(elements, fractions, real=real).output
