"""The CUDA code paths: their logic on the CPU (fake device queries, a fake fused kernel, the padded
forward path forced), and, marked ``cuda`` (skipped without a GPU; ``benchmarks/gpu_check.py`` runs
them), the same paths on a real GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from crabnet.data import compositions_from_formulas
from crabnet.training import model as model_module
from crabnet.training import optim
from crabnet.training.model import real_slots, sum_slots
from crabnet.training.optim import Lamb
from crabnet.training.recipe import build_model, resolve_precision

SMALL = {"d_model": 32, "n_heads": 4, "d_ff": 64, "head_dims": (32, 16)}
FORMULAS = ["Fe2O3", "NaCl", "Li0.5Co0.5O2", "Al2MgO4", "BaTiO3", "LiFePO4", "Cu3Zn", "SiO2"]


def _batch(width: int = 6):
    d = compositions_from_formulas(FORMULAS).padded(width)
    return d.elements, torch.as_tensor(d.elements), torch.as_tensor(d.fractions, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# precision: bf16 only where the target GPU runs it natively


def _fake_gpus(monkeypatch, capabilities: list[tuple[int, int]], keyword: bool = True) -> list[int]:
    """Pretend there are GPUs of these compute capabilities; returns the devices is_bf16_supported was asked about."""
    current, asked = [0], []

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], int(index)
        try:
            yield
        finally:
            current[0] = before

    def is_bf16_supported(including_emulation: bool = True) -> bool:  # as torch: asks the current device
        asked.append(current[0])
        return capabilities[current[0]] >= (8, 0) or including_emulation

    def legacy_is_bf16_supported() -> bool:  # an older torch without the keyword
        return True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_capability",
        lambda index=None: capabilities[current[0] if index is None else int(index)],
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported if keyword else legacy_is_bf16_supported)
    return asked


def test_auto_precision_asks_the_target_gpu_without_emulation(monkeypatch):
    asked = _fake_gpus(monkeypatch, [(7, 5), (9, 0)])  # cuda:0 a Turing (bf16 emulated only), cuda:1 a Hopper
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cuda:0") == "fp32"  # torch's default including_emulation=True would say bf16
    assert resolve_precision("auto", "cuda") == "fp32"  # the current device, cuda:0
    assert asked == [1, 0, 0]
    assert resolve_precision("fp32", "cuda:1") == "fp32" and resolve_precision("bf16", "cuda:0") == "bf16"


def test_auto_precision_falls_back_to_the_capability(monkeypatch):
    _fake_gpus(monkeypatch, [(7, 5), (8, 0)], keyword=False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", "cuda:0") == "fp32"
    assert resolve_precision("auto", "cuda:1") == "bf16"


def test_auto_precision_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp32"


# ------------------------------------------------------------------------------------------------
# Lamb: the fused kernel is checked against the foreach path once per device type


def _lamb_run(fused: bool, steps: int = 3) -> tuple[list[torch.Tensor], Lamb]:
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 4), (9,), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = Lamb(params, lr=0.02, fused=fused)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params], opt


def test_fused_probe_passes_on_the_cpu_and_lamb_stays_fused(monkeypatch, recwarn):
    if not hasattr(torch, "_fused_adamw_"):
        pytest.skip("this PyTorch has no fused Adam kernel")
    monkeypatch.setattr(optim, "_FUSED_VERDICT", {})
    result = optim.fused_adam_probe("cpu")
    assert result["ok"] and result["error"] is None and result["max_abs_diff"] < 1e-5
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    fused, _ = _lamb_run(fused=True)
    plain, _ = _lamb_run(fused=False)
    assert optim._FUSED_VERDICT == {"cpu": True}
    assert len(calls) == 1 + 3  # the probe once, then every step
    assert not [w for w in recwarn if "fused" in str(w.message)]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fault", ["wrong", "raises"])
def test_a_faulty_fused_kernel_falls_back_to_foreach_once(monkeypatch, fault):
    monkeypatch.setattr(optim, "_FUSED_VERDICT", {})
    calls = []

    def fake(steps, grads, m, v, *args, **kwargs):  # updates no moment and clears no stale step: a wrong kernel
        calls.append(1)
        if fault == "raises":
            raise RuntimeError("no kernel image is available for execution on the device")
        torch._foreach_add_(steps, m)

    monkeypatch.setattr(torch, "_fused_adamw_", fake, raising=False)
    with pytest.warns(RuntimeWarning, match="_fused_adamw_ on cpu.*using the foreach path"):
        got, _ = _lamb_run(fused=True)
    assert optim._FUSED_VERDICT == {"cpu": False} and len(calls) == 1  # probed once, never used for a step
    monkeypatch.undo()
    plain, _ = _lamb_run(fused=False)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


def test_foreach_norm_of_the_cuda_path_equals_the_dot_products():
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(s, generator=g) for s in [(40, 30), (7,), ()]]
    torch.testing.assert_close(torch.stack(torch._foreach_norm(ts)), optim._norms(ts), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# the forward pass without host synchronisations


def test_real_slots_and_ordered_sum():
    el_np, el, _ = _batch()
    real = real_slots(el_np)
    assert torch.equal(real, (el > 0).reshape(-1).nonzero().squeeze(1))
    values = torch.randn(len(real), 3, dtype=torch.float64)
    B, E = el.shape
    torch.testing.assert_close(sum_slots(values, real, B, E, ordered=True), sum_slots(values, real, B, E))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padded_path_and_given_slots_change_nothing(monkeypatch, precision):
    """Off the CPU the forward pass runs without host synchronisation: per-element work on every slot
    (no ``real``) or on the slots the caller found on the host (``real``). Both equal the CPU's path."""
    torch.manual_seed(7)
    model = build_model("onehot", **SMALL).eval()
    el_np, el, fr = _batch()
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 3e-2, "atol": 3e-2}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ref = model.forward_internals(el, fr, attention=True, hidden=True)
        given = model.forward_internals(el, fr, attention=True, hidden=True, real=real_slots(el_np))
        assert torch.equal(given.output, ref.output) and torch.equal(given.attention, ref.attention)
        monkeypatch.setattr(model_module, "_slots_on_host", lambda device: False)  # as on a GPU
        padded = model.forward_internals(el, fr, attention=True, hidden=True)
        given_gpu = model.forward_internals(el, fr, real=real_slots(el_np))
    torch.testing.assert_close(padded.output, ref.output, **tol)
    torch.testing.assert_close(padded.attention, ref.attention, **tol)
    torch.testing.assert_close(padded.hidden[-1].float(), ref.hidden[-1].float(), **tol)
    assert (padded.hidden[-1][el == 0] == 0).all()
    assert torch.equal(given_gpu.output, ref.output)
    d = compositions_from_formulas(["NaCl", "SiO2", "Fe2O3"]).padded(2)  # no padding at all
    el2, fr2 = torch.as_tensor(d.elements), torch.as_tensor(d.fractions, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        assert torch.equal(model(el2, fr2, real=real_slots(d.elements)), model(el2, fr2))


def test_padded_path_trains_like_the_gathered_one(monkeypatch):
    """Gradients through the padded path equal those through the gathered real rows."""
    _, el, fr = _batch()
    grads = []
    for padded in (False, True):
        torch.manual_seed(8)
        model = build_model("onehot", **{**SMALL, "dropout": 0.0})
        monkeypatch.setattr(model_module, "_slots_on_host", lambda device, p=padded: not p)
        model(el, fr).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# on a real GPU


@pytest.mark.cuda
def test_cuda_fused_lamb_equals_foreach(monkeypatch):
    monkeypatch.setattr(optim, "_FUSED_VERDICT", {})
    result = optim.fused_adam_probe("cuda")
    assert result["ok"], result
    g = torch.Generator().manual_seed(2)
    shapes = [(7, 5), (300,), (4, 3, 2), ()]
    a = [torch.nn.Parameter(torch.randn(s, generator=g).cuda()) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    c = [torch.nn.Parameter(p.detach().cpu().clone()) for p in a]
    fused, plain, cpu = Lamb(a, lr=0.02), Lamb(b, lr=0.02, fused=False), Lamb(c, lr=0.02, fused=False)
    for _ in range(4):
        gs = [torch.randn(s, generator=g) for s in shapes]
        for pa, pb, pc, gr in zip(a, b, c, gs):
            pa.grad, pb.grad, pc.grad = gr.cuda(), gr.cuda(), gr.clone()
        for opt in (fused, plain, cpu):
            opt.step()
    assert fused._fused_ok(a, [p.grad for p in a], 0.9, 0.999)
    for pa, pb, pc in zip(a, b, c):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pa.detach().cpu(), pc.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_captured_attention_equals_sdpa():
    """The captured weights (written out, float32 softmax) times V equal the layer's SDPA output."""
    torch.manual_seed(9)
    model = build_model("onehot").cuda().eval()
    _, el, fr = _batch()
    el, fr = el.cuda(), fr.cuda()
    with torch.no_grad():
        out = model.forward_internals(el, fr, attention=True, hidden=True)
        keep = el > 0
        for i, layer in enumerate(model.layers):
            x = out.hidden[i]
            B, E, _ = x.shape
            q, k, v = layer.self_attn.qkv(x).view(B, E, 3, model.cfg.n_heads, -1).permute(2, 0, 3, 1, 4)
            sdpa = model_module.attend(q, k, v, keep[:, None, None, :], 0.0, fused=True)  # (B, H, E, Dh)
            captured = out.attention[:, i] @ v  # (B, H, E, Dh)
            q_real = keep[:, None, :, None].expand_as(sdpa)
            torch.testing.assert_close(captured[q_real], sdpa[q_real], rtol=1e-4, atol=1e-4)  # a wrong mask: ~0.1


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_forward_paths_agree_with_the_cpu(precision):
    torch.manual_seed(10)
    model = build_model("onehot").eval()
    el_np, el, fr = _batch()
    with torch.no_grad():
        cpu = model(el, fr)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            padded = model(el.cuda(), fr.cuda())
            given = model(el.cuda(), fr.cuda(), real=real_slots(el_np, "cuda"))
    tol = {"rtol": 1e-4, "atol": 1e-4} if precision == "fp32" else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(padded.cpu(), cpu, **tol)
    torch.testing.assert_close(given.cpu(), cpu, **tol)
    np.testing.assert_array_equal(np.isfinite(padded.cpu().numpy()), True)
