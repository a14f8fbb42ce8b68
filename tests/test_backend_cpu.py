"""The tokenselect backend through SGLang's attention test kit, on CPU."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_tokenselect.backend import TokenSelectTorchBackend, UnsupportedConfigError
from sglang_tokenselect.config import TokenSelectConfig
from ts_fixtures import (
    ATOL,
    RTOL,
    build,
    decode_case,
    expected_tokenselect_decode,
    extend_case,
    forward,
    fresh_seed,
    make_batch,
    write_prefix_kv,
)

pytestmark = pytest.mark.sglang_contract

SMALL = dict(n_init=2, n_local=4, topk=8)  # budget 14 tokens


def small_backend(runner, **overrides) -> TokenSelectTorchBackend:
    cfg = TokenSelectConfig(**{**SMALL, "cache_threshold": 1.0, **overrides})
    return TokenSelectTorchBackend(runner, cfg)


@pytest.mark.parametrize(
    "case",
    [
        decode_case((7, 30, 63), name="mha_decode"),
        decode_case((1, 17, 50), num_heads=8, num_kv_heads=2, name="gqa_decode"),
        extend_case((0, 5, 20), (9, 3, 1), name="mha_extend"),
        extend_case((4, 0), (12, 30), num_heads=6, num_kv_heads=2, name="gqa_extend"),
    ],
    ids=lambda c: c.name,
)
def test_budget_covering_context_equals_torch_native(case):
    """With k + n_init + n_local >= L, tokenselect is dense attention, decode and extend."""
    run = build(case, fresh_seed())
    fx = run.fixture
    assert isinstance(fx.backend, TokenSelectTorchBackend)  # built by the registered factory
    assert fx.backend.ts_config.budget >= max(case.seq_lens)
    actual = forward(fx, fx.backend)
    native = forward(fx, TorchNativeAttnBackend(fx.runner))
    torch.testing.assert_close(actual, native, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    if case.forward_mode.is_decode():
        step = fx.backend.ts_step
        lens = torch.tensor(case.seq_lens)
        assert torch.equal(step.kv_indptr[1:].long(), torch.cumsum(lens, 0))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 3)], ids=["mha", "gqa4", "gqa2"])
def test_small_budget_decode_equals_independent_reference(heads):
    # Contexts below, at, just above and far above the 14-token budget; candidates fewer
    # than topk (L=15: 9 candidates for 8 picks is the tightest sparse case).
    case = decode_case((5, 13, 14, 40, 90), num_heads=heads[0], num_kv_heads=heads[1], name="sparse")
    run = build(case, fresh_seed())
    fx = run.fixture
    backend = small_backend(fx.runner)
    actual = forward(fx, backend)
    expected = expected_tokenselect_decode(fx, **SMALL)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    dense = forward(fx, TorchNativeAttnBackend(fx.runner))
    torch.testing.assert_close(actual[:2], dense[:2], atol=ATOL, rtol=RTOL)  # L = 6, 14: dense
    for row in (3, 4):  # L = 41, 91 keep 14 tokens (L = 15 drops one: may stay close)
        assert (actual[row] - dense[row]).abs().max() > ATOL, f"row {row} should differ from dense"
    assert backend.selection_cache.counts() == {"hits": 0, "misses": 3, "dense": 2, "overflow": 0}


def test_score_scale_layer_uses_the_layer_scaling():
    case = decode_case((60, 70), name="scale")
    run = build(case, fresh_seed())
    fx = run.fixture
    actual = forward(fx, small_backend(fx.runner, score_scale=None))
    expected = expected_tokenselect_decode(fx, **SMALL, score_scale=fx.reference_module.scaling)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


def test_reused_pool_row_starts_clean_and_radix_prefix_decodes_correctly():
    """Request A decodes on rows 0-1; requests B then take the rows with a prefix that came
    from the radix cache (only their suffix is extended). Their first decode must recompute
    the selection (no hit from A's cached query) and equal the independent reference."""
    seed = fresh_seed()
    run = build(decode_case((60, 45), name="owner_a"), seed)
    fx = run.fixture
    backend = small_backend(fx.runner, cache_threshold=0.0)  # θ=0: any cached selection would hit
    forward(fx, backend)
    assert backend.selection_cache.valid[0, :2].all()

    # B: 50 + 35 tokens of prefix already in the KV cache (radix hit), 3 + 2 extended now.
    gen = torch.Generator().manual_seed(seed + 1)
    hidden_size = fx.actual_module.hidden_size
    extend = extend_case((50, 35), (3, 2), name="owner_b_extend")
    ext_batch = make_batch(fx, extend)
    prefixes = [torch.randn(n, hidden_size, generator=gen).to(fx.input_hidden.dtype) for n in (50, 35)]
    write_prefix_kv(fx, ext_batch, prefixes)
    suffix = torch.randn(5, hidden_size, generator=gen).to(fx.input_hidden.dtype)
    forward(fx, backend, ext_batch, suffix)
    assert not backend.selection_cache.valid[0, :2].any(), "extend must forget the old owner's selection"

    decode = decode_case((53, 37), name="owner_b_decode")
    dec_batch = make_batch(fx, decode)
    fx.prefix_hidden = [torch.cat([prefixes[0], suffix[:3]]), torch.cat([prefixes[1], suffix[3:]])]
    fx.input_hidden = torch.randn(2, hidden_size, generator=gen).to(suffix.dtype)
    actual = forward(fx, backend, dec_batch)
    expected = expected_tokenselect_decode(fx, **SMALL)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    assert backend.selection_cache.counts()["hits"] == 0


class _Runner:
    """The attributes check_runner_supported reads, all supported."""

    def __init__(self, **overrides):
        from types import SimpleNamespace

        self.use_mla_backend = False
        self.model_config = SimpleNamespace(is_encoder_decoder=False)
        self.sliding_window_size = None
        self.page_size = 1
        self.dtype = self.kv_cache_dtype = torch.bfloat16
        self.spec_algorithm = SimpleNamespace(is_none=lambda: True)
        for key, value in overrides.items():
            setattr(self, key, value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(use_mla_backend=True), "MLA"),
        (dict(sliding_window_size=4096), "sliding-window"),
        (dict(page_size=16), "--page-size 1"),
        (dict(kv_cache_dtype=torch.float8_e4m3fn), "--kv-cache-dtype"),
        (dict(spec_algorithm=type("S", (), {"is_none": lambda self: False})()), "--speculative-algorithm"),
    ],
)
def test_unsupported_models_are_refused_by_name(overrides, needle):
    from sglang_tokenselect.backend import check_runner_supported

    check_runner_supported(_Runner())  # the baseline passes
    with pytest.raises(UnsupportedConfigError, match=needle):
        check_runner_supported(_Runner(**overrides))
