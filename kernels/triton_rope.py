"""Length extrapolation's per-layer re-rotation in one launch (specification:
``reference.extrapolation_qk_reference``).

The model rotated q and k at their true positions; this kernel un-rotates both (the key goes to
the pool pre-RoPE, the query to FlashInfer, which re-applies RoPE over list positions) and
rotates the un-rotated query to position ``n_local`` for the selection. The cos/sin of every
token's angles are computed once per forward by :func:`rope_tables` (torch's accurate float32
cos/sin; the kernel only multiplies and adds), so a decode layer costs one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[T] positions -> (cos, sin) [T, D/2] float32 of ``reference.rope_angles_reference``."""
    from sglang_tokenselect.kernels.reference import rope_angles_reference

    angles = rope_angles_reference(positions, head_dim, theta, scale)
    return angles.cos(), angles.sin()


@triton.jit
def _rerotate_kernel(x_ptr, stride_xt, stride_xh, pre_ptr, sel_ptr, cos_ptr, sin_ptr, cos_sel_ptr, sin_sel_ptr,
                     num_heads, HALF: tl.constexpr, BLOCK: tl.constexpr, WITH_SEL: tl.constexpr):
    """One (token, head) row: pre = R(-p) x; with WITH_SEL, sel = R(n_local) pre (pre in float32)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    src = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * HALF + offs, mask=mask, other=1.0)
    s = tl.load(sin_ptr + t * HALF + offs, mask=mask, other=0.0)
    p1 = x1 * c + x2 * s
    p2 = x2 * c - x1 * s
    dst = (t * num_heads + h) * 2 * HALF
    tl.store(pre_ptr + dst + offs, p1.to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(pre_ptr + dst + HALF + offs, p2.to(pre_ptr.dtype.element_ty), mask=mask)
    if WITH_SEL:
        cl = tl.load(cos_sel_ptr + offs, mask=mask, other=1.0)
        sl = tl.load(sin_sel_ptr + offs, mask=mask, other=0.0)
        tl.store(sel_ptr + dst + offs, (p1 * cl - p2 * sl).to(sel_ptr.dtype.element_ty), mask=mask)
        tl.store(sel_ptr + dst + HALF + offs, (p2 * cl + p1 * sl).to(sel_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, tables, sel_tables, with_sel: bool):
    t, heads, d = x.shape
    pre = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    sel = torch.empty_like(pre) if with_sel else pre
    if t and heads:
        cos, sin = tables
        cos_sel, sin_sel = sel_tables
        half = d // 2
        _rerotate_kernel[(t, heads)](x, x.stride(0), x.stride(1), pre, sel, cos, sin, cos_sel, sin_sel, heads,
                                     HALF=half, BLOCK=triton.next_power_of_2(half), WITH_SEL=with_sel)
    return pre, sel


def extrapolation_qk(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
                     sel_tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_pre, k_pre, q_sel) of ``reference.extrapolation_qk_reference``.

    Args:
        q: [T, H_q, D], k: [T, H_kv, D] (last dim contiguous), rotated at the positions of ``tables``.
        tables: ``rope_tables(positions, ...)``, (cos, sin) [>= T, D/2] float32 contiguous.
        sel_tables: (cos, sin) [D/2] float32 of the angles of position ``n_local``.
    Two launches (q, k); no host synchronisation.
    """
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.shape[-1] % 2 == 0
    q_pre, q_sel = _launch(q, tables, sel_tables, True)
    k_pre, _ = _launch(k, tables, sel_tables, False)
    return q_pre, k_pre, q_sel
