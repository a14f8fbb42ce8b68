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
    assert backend.selection_cache.counts() == {"hits": 0, "misses": 3, "dense": 2}


def test_decode_cuda_graph_replay_equals_independent_reference():
    """Capture one decode step in a real CUDA graph (bs 4, contexts of length 1), then
    replay it for 3 real requests (dense, sparse, far past the budget) plus one padded row."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from ts_fixtures import make_batch, write_prefix_kv

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    capture_case = decode_case((0, 0, 0, 0), 8, 2, name="graph_capture")
    fx = build(capture_case, seed, device="cuda", head_dim=64, disable_cuda_graph=False,
               runner_batch_size=4).fixture
    backend = type(fx.backend)(fx.runner, TokenSelectConfig(**SMALL, cache_threshold=1.0))
    batch = fx.forward_batch
    hidden = fx.input_hidden.clone()
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
        backend.init_forward_metadata_out_graph(batch, in_capture=True)
        for _ in range(2):  # warm-up compiles the kernels outside the capture
            fx.actual_module(hidden, batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fx.actual_module(hidden, batch)

        replay_case = decode_case((13, 40, 90, 0), 8, 2, name="graph_replay")
        replay = make_batch(fx, replay_case)
        prefixes = [torch.randn(n, hidden.shape[1], generator=gen).to("cuda", hidden.dtype) for n in (13, 40, 90, 0)]
        write_prefix_kv(fx, replay, prefixes)
        for name in ("req_pool_indices", "seq_lens", "out_cache_loc", "positions", "input_ids"):
            getattr(batch, name).copy_(getattr(replay, name))
        batch.seq_lens_cpu.copy_(replay.seq_lens_cpu)
        batch.seq_lens_sum = replay.seq_lens_sum
        hidden.copy_(torch.randn(hidden.shape, generator=gen).to("cuda", hidden.dtype))
        backend.init_forward_metadata_out_graph(batch)
        graph.replay()
        torch.cuda.synchronize()

    fx.prefix_hidden, fx.input_hidden = prefixes[:3], hidden[:3]
    expected = expected_tokenselect_decode(fx, **SMALL)
    torch.testing.assert_close(out[:3], expected, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    assert backend.selection_cache.misses.sum().item() == 2  # the two sparse rows, replay only
