"""Shared helpers for CPU tests that drive the backend through SGLang's attention test kit."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.test.kits.attention_unittest.attention_methods.dense_attention import (
    DenseAttentionCase,
    _make_forward_batch,
    build_dense_attention_fixture,
)

from sglang.srt.runtime_context import get_parallel

from sglang_tokenselect.plugin import register

register()
# Like the kit's attn_tp_size override: single-rank defaults where no process group exists
# (FlashInfer's backend reads the attention context-parallel size).
_CP_OVERRIDE = get_parallel().override(attn_cp_size=1, attn_cp_rank=0)  # kept: GC would undo it
_CP_OVERRIDE.__enter__()

DTYPE = torch.float16
HEAD_DIM = 16
HIDDEN = 64
MAX_CTX = 128
ATOL = RTOL = 3e-2  # the tolerance of SGLang's own dense-attention kit tests


class _TestCaseShim:
    def skipTest(self, reason):  # noqa: N802 (unittest's name)
        # The kit skips a backend that fails to build; for our own backend that is a failure.
        raise RuntimeError(f"backend failed to build: {reason}")


def fresh_seed() -> int:
    """A new seed per check; tests put it in their failure messages."""
    return int.from_bytes(os.urandom(4), "little")


def decode_case(prefix_lens, num_heads=4, num_kv_heads=4, name="decode") -> DenseAttentionCase:
    return DenseAttentionCase(name=name, backend="tokenselect", forward_mode=ForwardMode.DECODE,
                              num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=1,
                              prefix_lens=tuple(prefix_lens))


def extend_case(prefix_lens, extend_lens, num_heads=4, num_kv_heads=4, name="extend") -> DenseAttentionCase:
    return DenseAttentionCase(name=name, backend="tokenselect", forward_mode=ForwardMode.EXTEND,
                              num_heads=num_heads, num_kv_heads=num_kv_heads, page_size=1,
                              prefix_lens=tuple(prefix_lens), extend_lens=tuple(extend_lens))


@dataclass
class Run:
    """A kit fixture whose inputs were redrawn from ``seed``."""

    fixture: object
    seed: int


def build(case: DenseAttentionCase, seed: int, device: str = "cpu", **kwargs) -> Run:
    """Build a kit fixture, then redraw its hidden states and KV from ``seed``."""
    kwargs.setdefault("head_dim", HEAD_DIM)
    # no_grad: newer SGLang releases (0.5.23) write K/V projected with grad in place into the
    # pool, which autograd refuses on CPU.
    with torch.no_grad():
        fixture = build_dense_attention_fixture(
            _TestCaseShim(), case, hidden_size=HIDDEN, max_context_len=MAX_CTX,
            dtype=DTYPE, device=device, **kwargs,
        )
        redraw_inputs(fixture, seed)
    return Run(fixture, seed)


def redraw_inputs(fixture, seed: int) -> None:
    """Fresh hidden states, and the prefix K/V they project to, at the batch's own slots."""
    gen = torch.Generator().manual_seed(seed)
    case, device = fixture.case, fixture.input_hidden.device
    fixture.prefix_hidden = [torch.randn(n, HIDDEN, generator=gen).to(device, DTYPE) for n in case.prefix_lens]
    fixture.input_hidden = torch.randn(case.num_input_tokens, HIDDEN, generator=gen).to(device, DTYPE)
    write_prefix_kv(fixture, fixture.forward_batch, fixture.prefix_hidden)


@torch.no_grad()
def write_prefix_kv(fixture, batch, prefix_hidden) -> None:
    module, pool = fixture.actual_module, fixture.runner.token_to_kv_pool
    req_to_token = fixture.runner.req_to_token_pool.req_to_token
    for b, hidden in enumerate(prefix_hidden):
        if hidden.shape[0] == 0:
            continue
        _, k, v = module.project_qkv(hidden)
        row = int(batch.req_pool_indices[b])
        slots = req_to_token[row, : hidden.shape[0]].long()
        pool.set_kv_buffer(module.attn, slots, k.view(-1, module.num_kv_heads, module.head_dim),
                           v.view(-1, module.num_kv_heads, module.head_dim))


def forward(fixture, backend, batch=None, hidden=None) -> torch.Tensor:
    batch = fixture.forward_batch if batch is None else batch
    hidden = fixture.input_hidden if hidden is None else hidden
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(batch)
        return fixture.actual_module(hidden, batch)


def make_batch(fixture, case: DenseAttentionCase):
    """A new ForwardBatch for ``case`` on the fixture's runner (rows 0..B-1)."""
    device = str(fixture.input_hidden.device)
    return _make_forward_batch(case, fixture.runner, max_context_len=MAX_CTX, device=device)


# --- an independent TokenSelect reference, built from the kit's reference module -------------

def decode_request_qkv(fixture):
    """Per decode request, in order: its query ``[H_q, D]`` and the keys and values of its whole
    context, the prefix and the new token, ``[L, H_q, D]`` (head h reads kv head h // group),
    projected by the kit's reference module; fp32 on the CPU."""
    ref = fixture.reference_module
    group = ref.num_heads // ref.num_kv_heads
    q_all, k_new, v_new = ref.project_qkv(fixture.input_hidden)
    for b, prefix in enumerate(fixture.prefix_hidden):
        _, k_pre, v_pre = ref.project_qkv(prefix)
        keys, values = (
            torch.cat([pre, new[b : b + 1]]).view(-1, ref.num_kv_heads, ref.head_dim).float().cpu()
            .repeat_interleave(group, 1)
            for pre, new in ((k_pre, k_new), (v_pre, v_new))
        )
        yield q_all[b].view(ref.num_heads, ref.head_dim).float().cpu(), keys, values


def expected_tokenselect_decode(fixture, *, n_init, n_local, topk, score_scale=1.0) -> torch.Tensor:
    """Selection then attention for each decode request, written without the package's code.

    Returns the module output [B, hidden] in the fixture dtype.
    """
    ref = fixture.reference_module
    outs = []
    for q, keys_h, values_h in decode_request_qkv(fixture):
        length = keys_h.shape[0]
        if length <= n_init + topk + n_local:
            chosen = torch.arange(length)
        else:
            cand = torch.arange(n_init, length - n_local)
            scores = torch.einsum("hd,jhd->hj", q, keys_h[cand]) * score_scale
            votes = torch.softmax(scores, dim=1).sum(0)
            best = cand[votes.argsort(descending=True)[:topk]]
            chosen = torch.cat([torch.arange(n_init), best, torch.arange(length - n_local, length)])
        logits = torch.einsum("hd,jhd->hj", q, keys_h[chosen]) * ref.scaling
        out = torch.einsum("hj,jhd->hd", torch.softmax(logits, dim=1), values_h[chosen])
        outs.append(out.reshape(-1))
    attn = torch.stack(outs).to(fixture.input_hidden.device, fixture.input_hidden.dtype)
    return ref.reconstruct_output(attn)
