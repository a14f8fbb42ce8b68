"""The CUDA backend (FlashInfer decode over Triton selections) against the same references.

Skipped without a GPU; run on the GPU host by benchmarks/gpu_session.sh.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_tokenselect.backend import TokenSelectDecodeMixin, create_tokenselect_backend
    from sglang_tokenselect.config import TokenSelectConfig
    from ts_fixtures import (
        ATOL, RTOL, build, decode_case, expected_tokenselect_decode, extend_case, forward, fresh_seed,
    )

SMALL = dict(n_init=2, n_local=4, topk=8)


@pytest.mark.parametrize("case_args", [
    ("decode", (7, 30, 63), (), 4, 4),
    ("decode", (1, 17, 50), (), 8, 2),
    ("extend", (0, 5, 20), (9, 3, 1), 4, 4),
], ids=["mha_decode", "gqa_decode", "mha_extend"])
def test_budget_covering_context_equals_flashinfer(case_args):
    mode, prefix, ext, hq, hkv = case_args
    case = (decode_case(prefix, hq, hkv, name=f"g{mode}") if mode == "decode"
            else extend_case(prefix, ext, hq, hkv, name=f"g{mode}"))
    run = build(case, fresh_seed(), device="cuda", head_dim=64)
    fx = run.fixture
    assert isinstance(fx.backend, TokenSelectDecodeMixin) and isinstance(fx.backend, FlashInferAttnBackend)
    actual = forward(fx, fx.backend)
    dense = forward(fx, FlashInferAttnBackend(fx.runner))
    torch.testing.assert_close(actual, dense, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
def test_small_budget_decode_equals_independent_reference(heads):
    case = decode_case((5, 13, 14, 40, 90), num_heads=heads[0], num_kv_heads=heads[1], name="gsparse")
    run = build(case, fresh_seed(), device="cuda", head_dim=64)
    fx = run.fixture
    backend_cls = type(create_tokenselect_backend(fx.runner))
    backend = backend_cls(fx.runner, TokenSelectConfig(**SMALL, cache_threshold=1.0))
    actual = forward(fx, backend)
    expected = expected_tokenselect_decode(fx, **SMALL)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    assert backend.selection_cache.counts() == {"hits": 0, "misses": 3, "dense": 2, "overflow": 0}


class CapturedDecode:
    """One decode step of the kit's attention module captured in a real CUDA graph for ``bs``
    requests (contexts of length 1 at capture), ready to replay other batches."""

    def __init__(self, bs: int, config: "TokenSelectConfig", seed: int, rope=None):
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        self.gen = torch.Generator().manual_seed(seed)
        self.fx = build(decode_case((0,) * bs, 8, 2, name=f"graph_capture_{bs}"), seed, device="cuda",
                        head_dim=64, disable_cuda_graph=False, runner_batch_size=bs).fixture
        self.backend = type(self.fx.backend)(self.fx.runner, config, rope=rope)
        self.batch, self.hidden = self.fx.forward_batch, self.fx.input_hidden.clone()
        self.context = lambda: forward_context(ForwardContext(attn_backend=self.backend))  # noqa: E731
        with torch.no_grad(), self.context():
            self.backend.init_cuda_graph_state(max_bs=bs, max_num_tokens=bs)
            self.backend.init_forward_metadata_out_graph(self.batch, in_capture=True)
            for _ in range(2):  # warm-up compiles the kernels outside the capture
                self.fx.actual_module(self.hidden, self.batch)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fx.actual_module(self.hidden, self.batch)

    def load(self, prefix_lens) -> None:
        """Point the captured batch at new requests with these prefixes (fresh K/V, queries)."""
        from ts_fixtures import make_batch, write_prefix_kv

        fx = self.fx
        replay = make_batch(fx, decode_case(prefix_lens, 8, 2, name="graph_replay"))
        prefixes = [torch.randn(n, self.hidden.shape[1], generator=self.gen).to("cuda", self.hidden.dtype)
                    for n in prefix_lens]
        write_prefix_kv(fx, replay, prefixes)
        for name in ("req_pool_indices", "seq_lens", "out_cache_loc", "positions", "input_ids"):
            getattr(self.batch, name).copy_(getattr(replay, name))
        self.batch.seq_lens_cpu.copy_(replay.seq_lens_cpu)
        self.batch.seq_lens_sum = replay.seq_lens_sum
        self.hidden.copy_(torch.randn(self.hidden.shape, generator=self.gen).to("cuda", self.hidden.dtype))
        fx.prefix_hidden = prefixes

    def replay(self) -> torch.Tensor:
        with torch.no_grad(), self.context():
            self.backend.init_forward_metadata_out_graph(self.batch)
            self.graph.replay()
        torch.cuda.synchronize()
        return self.out.clone()

    def expected(self, real: int) -> torch.Tensor:
        fx = self.fx
        full = fx.prefix_hidden, fx.input_hidden
        fx.prefix_hidden, fx.input_hidden = fx.prefix_hidden[:real], self.hidden[:real]
        try:
            return expected_tokenselect_decode(fx, **SMALL)
        finally:
            fx.prefix_hidden, fx.input_hidden = full


def test_decode_cuda_graph_replay_equals_independent_reference():
    """Replay for 3 real requests (dense, sparse, far past the budget) plus one padded row."""
    seed = fresh_seed()
    cap = CapturedDecode(4, TokenSelectConfig(**SMALL, cache_threshold=1.0), seed)
    cap.load((13, 40, 90, 0))
    out = cap.replay()
    torch.testing.assert_close(out[:3], cap.expected(3), atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    counts = cap.backend.selection_cache.counts()
    assert counts["misses"] == 2 and counts["hits"] == 0, counts  # the two sparse rows, replay only


def test_decode_cuda_graph_above_32_requests():
    """40 requests of mixed lengths in one captured graph (the old scratch capped graphs at 32)."""
    seed = fresh_seed()
    cap = CapturedDecode(40, TokenSelectConfig(**SMALL, cache_threshold=1.0), seed)
    lens = torch.randint(0, 120, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    cap.load(lens)
    out = cap.replay()
    torch.testing.assert_close(out, cap.expected(40), atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    sparse = sum(n + 1 > sum(SMALL.values()) for n in lens)
    assert cap.backend.selection_cache.counts()["misses"] == sparse


@pytest.mark.parametrize("threshold", [-1.0, 0.9])
def test_decode_cuda_graph_replay_with_selection_cache_hits(threshold):
    """The same step replayed twice: the second replay hits the cache on every sparse row
    (static selection at -1; the very same query at 0.9) and gives the same output."""
    seed = fresh_seed()
    cap = CapturedDecode(4, TokenSelectConfig(**SMALL, cache_threshold=threshold), seed)
    cap.load((13, 40, 90, 0))
    first = cap.replay()
    torch.testing.assert_close(first[:3], cap.expected(3), atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    second = cap.replay()
    counts = cap.backend.selection_cache.counts()
    assert counts["misses"] == 2 and counts["hits"] == 2, counts
    torch.testing.assert_close(second, first, atol=0, rtol=0, msg=f"seed {seed}")


def test_sparse_extend_flashinfer_attends_its_selection():
    """Sparse prefill through FlashInfer (written without a GPU; first run pending): the output
    equals the independent attention of tests/test_sparse_prefill.py over the slots the Triton
    selection chose (the selection itself is checked there, through Triton's interpreter)."""
    from test_sparse_prefill import config, contexts, expected_sparse_extend, poison_unowned_slots

    case = extend_case((0, 0, 30), (10, 60, 25), 4, 2, name="gsparse_prefill")
    run = build(case, fresh_seed(), device="cuda", head_dim=64)
    fx, cfg = run.fixture, config(chunk=4)
    backend = type(create_tokenselect_backend(fx.runner))(fx.runner, cfg)
    poison_unowned_slots(fx, fx.forward_batch)
    actual = forward(fx, backend)
    step = backend.ts_prefill
    r2t = fx.runner.req_to_token_pool.req_to_token.cpu()
    rows = fx.forward_batch.req_pool_indices.cpu().long()[step.plan.req]
    indices, indptr = step.kv_indices.cpu(), step.kv_indptr.cpu()

    def top_of(b, s, e):
        i = int(((step.plan.req == b) & (step.plan.start == s) & (step.plan.end == e)).nonzero())
        slot_to_pos = {int(r2t[int(rows[i]), p]): p for p in range(e)}
        slots = indices[int(indptr[i]) + cfg.n_init : int(indptr[i + 1]) - cfg.n_local]
        return torch.tensor([slot_to_pos[int(x)] for x in slots])

    expected = expected_sparse_extend(fx, contexts(fx, case.prefix_lens), case.prefix_lens, case.extend_lens, cfg,
                                      top_of=top_of)
    assert torch.isfinite(actual).all(), f"seed {run.seed}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


# --- length extrapolation (written without a GPU; first run pending). FlashInfer applies RoPE
# in-kernel (ROPE_LLAMA); the CPU tests (tests/test_extrapolation.py) check the same semantics
# through the PyTorch references. --------------------------------------------------------------

WIDE = dict(n_init=4, n_local=16, topk=200, cache_threshold=1.0)  # budget 220 >= the kit's contexts


@pytest.mark.parametrize("case_args", [
    ("decode", (7, 30, 100), (), 4, 4),
    ("decode", (1, 17, 60, 120), (), 8, 2),
    ("extend", (0, 5, 20), (9, 3, 1), 4, 4),
    ("extend", (4, 0, 33), (12, 70, 40), 8, 2),
], ids=["mha_decode", "gqa_decode", "mha_extend", "gqa_extend"])
def test_extrapolation_with_budget_covering_context_equals_flashinfer(case_args):
    """Pre-RoPE keys in the pool, FlashInfer's in-kernel RoPE over list positions (= true positions
    here): the output equals FlashInfer over keys SGLang rotated."""
    from test_extrapolation import normal_and_extrapolated

    mode, prefix, ext, hq, hkv = case_args
    case = (decode_case(prefix, hq, hkv, name=f"gx{mode}") if mode == "decode"
            else extend_case(prefix, ext, hq, hkv, name=f"gx{mode}"))
    run = build(case, fresh_seed(), device="cuda", head_dim=64)
    fx = run.fixture
    cls = type(fx.backend)
    normal, native, extrapolated, backend = normal_and_extrapolated(
        fx, TokenSelectConfig(**WIDE),
        TokenSelectConfig(**WIDE, sparse_prefill=True, prefill_chunk=8, extrapolate=True),
        backend_cls=cls, native_cls=FlashInferAttnBackend)
    assert backend.ts_rope is not None
    torch.testing.assert_close(normal, native, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    torch.testing.assert_close(extrapolated, normal, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


def test_extrapolation_small_budget_decode_equals_the_cpu_reference():
    """Past the budget: FlashInfer's RoPE decode over the Triton selection equals the reference
    attention with rope=(theta, scale) over the same slots (query at n - 1, keys at 0..n-1)."""
    from test_extrapolation import ROPE, roped_forward, rotary_for_tests, write_prefix

    from sglang_tokenselect.kernels import reference as ref

    case = decode_case((9, 40, 90, 200), 8, 2, name="gx_sparse")
    run = build(case, fresh_seed(), device="cuda", head_dim=64)
    fx = run.fixture
    cfg = TokenSelectConfig(**SMALL, cache_threshold=1.0, sparse_prefill=True, prefill_chunk=4, extrapolate=True)
    backend = type(fx.backend)(fx.runner, cfg, rope=ROPE)
    write_prefix(fx, fx.forward_batch, fx.prefix_hidden)
    rotary = rotary_for_tests("cuda")
    captured = {}
    attn = fx.actual_module.attn
    original = attn.forward

    def spy(q, k, v, forward_batch, *args, **kwargs):
        captured["q"], captured["k"] = q.clone(), k.clone()
        return original(q, k, v, forward_batch, *args, **kwargs)

    attn.forward = spy
    try:
        roped_forward(fx, backend, rotary)
    finally:
        attn.forward = original
    step = backend.ts_step
    q_pre, _, _ = backend._rerotate(captured["q"], captured["k"], attn, fx.forward_batch)
    pool = fx.runner.token_to_kv_pool
    want = ref.paged_decode_attention_reference(
        q_pre.cpu(), pool.get_key_buffer(0).cpu(), pool.get_value_buffer(0).cpu(), step.kv_indptr.cpu(),
        step.kv_indices.cpu(), attn.scaling, rope=ROPE.params)
    got = backend.forward_decode(captured["q"], None, None, attn, fx.forward_batch, save_kv_cache=False)
    torch.testing.assert_close(got.view(want.shape).cpu(), want, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


def test_extrapolation_decode_cuda_graph_replay_equals_eager():
    """The decode CUDA graph's plan (SGLang's fast_decode_plan) keeps FlashInfer's RoPE kernel and
    parameters: a replay equals an eager step of a fresh backend on the same batch."""
    from test_extrapolation import ROPE

    seed = fresh_seed()
    cfg = TokenSelectConfig(**SMALL, cache_threshold=1.0, sparse_prefill=True, prefill_chunk=4, extrapolate=True)
    cap = CapturedDecode(4, cfg, seed, rope=ROPE)
    cap.load((13, 40, 90, 0))
    out = cap.replay()
    eager = type(cap.backend)(cap.fx.runner, cfg, rope=ROPE)
    want = forward(cap.fx, eager, cap.batch, cap.hidden)
    torch.testing.assert_close(out[:3], want[:3], atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
