"""Length extrapolation (--tokenselect-extrapolate) on CPU.

- RoPE references against SGLang's own rotation (its ``RotaryEmbedding.forward_native``, the
  op models run before the attention backend): un-rotating then rotating reproduces the keys.
- The CPU backend through SGLang's attention test kit, with the kit's attention module wrapped
  to rotate q and k by their positions first (as models do): with a budget covering the
  context (attended-list index = true position) the extrapolation path equals the normal path,
  decode and extend; with a small budget, decode attends RoPE over list positions and selects
  with the query rotated to ``n_local`` (checked against this file's own rotation); a radix
  prefix written by an earlier request is reused as is.
- Models whose RoPE FlashInfer cannot apply in-kernel are refused in one line.

Every check draws fresh random inputs; the seed is in the failure message.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import sglang.srt.layers.rotary_embedding.base as sgl_rope
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

from sglang_tokenselect.backend import TokenSelectTorchBackend, UnsupportedConfigError, rope_spec_of_runner
from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.rope import RopeSpec, UnsupportedRopeError, rope_spec_of_hf_config
from ts_fixtures import ATOL, HEAD_DIM, RTOL, build, decode_case, decode_request_qkv, extend_case, fresh_seed, make_batch

pytestmark = pytest.mark.sglang_contract

BF16_TOL = dict(atol=2e-2, rtol=1.6e-2)  # a few bf16 ulps (2^-8 relative)


# ----------------------------------------------------------------------------- SGLang's rotation


def sglang_rotary(cls=sgl_rope.RotaryEmbedding, *, head_dim=HEAD_DIM, rotary_dim=None, theta=1e4, max_pos=4096,
                  neox=True, **extra):
    """One of SGLang's rotary classes, its fields set without its platform checks (its constructor
    picks a CUDA/vLLM kernel off-CPU); its float32 cos/sin cache computed by its own method."""
    rotary = object.__new__(cls)
    torch.nn.Module.__init__(rotary)
    rotary.head_size, rotary.rotary_dim = head_dim, rotary_dim or head_dim
    rotary.max_position_embeddings, rotary.base, rotary.is_neox_style = max_pos, theta, neox
    rotary.dtype = torch.float16
    rotary._force_native, rotary.position_start = False, 0  # fields newer SGLang releases read (0.5.23)
    for name, value in extra.items():
        setattr(rotary, name, value)
    if cls in (sgl_rope.RotaryEmbedding, sgl_rope.LinearScalingRotaryEmbedding):
        with pytest.MonkeyPatch.context() as mp:  # its inv_freq reads SGLang's runtime context
            mp.setattr(sgl_rope, "get_exec", lambda: SimpleNamespace(deterministic=SimpleNamespace(rl_on_policy_target=None)))
            rotary.cos_sin_cache = cls._compute_cos_sin_cache(rotary)
        rotary._apply_rotary_emb_wrapped = sgl_rope.apply_rotary_emb
    return rotary


def sglang_rotate(rotary, positions, q, k):
    """SGLang's rotation of q [T, H_q * D] and k [T, H_kv * D] (what models pass to attention)."""
    return rotary.forward_native(positions, q.clone(), k.clone())


def complex_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, scale: float = 1.0) -> torch.Tensor:
    """This file's own RoPE: pairs (j, j + D/2) as complex numbers times e^{i p/scale theta^(-2j/D)}.
    x [T, H, D] -> float64."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    turn = torch.polar(torch.ones(positions.numel(), d // 2, dtype=torch.float64),
                       (positions.double() / scale)[:, None] * freq[None])
    z = z * turn[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("theta, scale", [(1e4, 1.0), (1e5, 1.0), (5e5, 4.0)])
def test_rope_reference_matches_sglang_and_unrotation_inverts_it(theta, scale):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    t, heads, d, max_pos = 64, 3, 64, 65536
    positions = torch.randint(0, max_pos, (t,), generator=gen)
    positions[:4] = torch.tensor([0, 1, max_pos - 1, 8191])
    keys = torch.randn(t, heads, d, generator=gen).to(torch.bfloat16)
    cls = sgl_rope.RotaryEmbedding if scale == 1.0 else sgl_rope.LinearScalingRotaryEmbedding
    extra = {} if scale == 1.0 else dict(scaling_factors=[scale])
    rotary = sglang_rotary(cls, head_dim=d, theta=theta, max_pos=max_pos // int(scale), **extra)
    _, roped = sglang_rotate(rotary, positions, keys.view(t, -1), keys.view(t, -1))
    roped = roped.view(t, heads, d)
    assert roped.dtype == torch.bfloat16
    # our rotation is SGLang's (float32 angles: the same products), up to its bf16 rounding
    ours = ref.rope_rotate_reference(keys, positions, theta, scale)
    torch.testing.assert_close(ours.to(torch.bfloat16).float(), roped.float(), **BF16_TOL, msg=f"seed {seed}")
    # and the exact rotation, up to float32 angle rounding at large positions
    torch.testing.assert_close(ours.double(), complex_rotate(keys, positions, theta, scale), atol=2e-2, rtol=0,
                               msg=f"seed {seed}")
    # un-rotate SGLang's bf16 keys (float32), store bf16: the pre-RoPE keys within bf16 tolerance
    back = ref.rope_unrotate_reference(roped, positions, theta, scale).to(torch.bfloat16)
    torch.testing.assert_close(back.float(), keys.float(), **BF16_TOL, msg=f"seed {seed}")
    # then rotating again reproduces SGLang's keys
    again = ref.rope_rotate_reference(back, positions, theta, scale).to(torch.bfloat16)
    torch.testing.assert_close(again.float(), roped.float(), **BF16_TOL, msg=f"seed {seed}")


def test_extrapolation_qk_reference():
    """q_pre and k_pre undo the rotation; q_sel is q_pre at position n_local: its score against
    a pre-RoPE key is the model's score of a key n_local positions back."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    t, hq, hkv, d, theta, n_local = 20, 4, 2, 32, 1e4, 37
    positions = torch.randint(0, 30000, (t,), generator=gen)
    q_raw = torch.randn(t, hq, d, generator=gen)
    k_raw = torch.randn(t, hkv, d, generator=gen)
    q = complex_rotate(q_raw, positions, theta).float()
    k = complex_rotate(k_raw, positions, theta).float()
    q_pre, k_pre, q_sel = ref.extrapolation_qk_reference(q, k, positions, theta=theta, scale=1.0, n_local=n_local)
    torch.testing.assert_close(q_pre, q_raw, atol=5e-3, rtol=0, msg=f"seed {seed}")
    torch.testing.assert_close(k_pre, k_raw, atol=5e-3, rtol=0, msg=f"seed {seed}")
    at = torch.full((t,), n_local)
    torch.testing.assert_close(q_sel.double(), complex_rotate(q_raw, at, theta), atol=5e-3, rtol=0, msg=f"seed {seed}")
    model_score = (complex_rotate(q_raw, at, theta)[:, 0] * k_raw[:, 0].double()).sum(-1)  # key at 0, query at n_local
    torch.testing.assert_close((q_sel[:, 0] * k_pre[:, 0]).sum(-1).double(), model_score, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_rerotation_matches_the_reference(dtype):
    """kernels/triton_rope.py (Triton's interpreter on CPU) against reference.extrapolation_qk_reference,
    on strided q/k views like the model's split of a fused qkv projection."""
    from sglang_tokenselect.kernels import triton_rope

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    t, hq, hkv, d, theta, scale, n_local = 7, 4, 2, 64, 1e5, 2.0, 33
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    positions = torch.randint(0, 70000, (t,), generator=gen)
    tables = triton_rope.rope_tables(positions, d, theta, scale)
    cos, sin = triton_rope.rope_tables(torch.tensor([n_local]), d, theta, scale)
    got = triton_rope.extrapolation_qk(q, k, tables, (cos[0], sin[0]))
    want = ref.extrapolation_qk_reference(q, k, positions, theta=theta, scale=scale, n_local=n_local)
    for name, a, b in zip(("q_pre", "k_pre", "q_sel"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=f"{name} seed {seed}")


# ----------------------------------------------------------------------------- the backend

THETA, SCALE = 1e4, 2.0
ROPE = RopeSpec(head_dim=HEAD_DIM, theta=THETA, scale=SCALE, max_position=4096)
WIDE = dict(n_init=4, n_local=16, topk=200, cache_threshold=1.0)  # budget 220 >= the kit's contexts (128)
SMALL = dict(n_init=2, n_local=6, topk=8, cache_threshold=1.0)  # budget 16


def rotary_for_tests(device="cpu"):
    rotary = sglang_rotary(sgl_rope.LinearScalingRotaryEmbedding, theta=THETA, max_pos=4096, scaling_factors=[SCALE])
    rotary.cos_sin_cache = rotary.cos_sin_cache.to(device)
    return rotary


def roped_forward(fx, backend, rotary, batch=None, hidden=None) -> torch.Tensor:
    """The kit's attention module as a model runs it: q and k rotated at the batch's positions by
    SGLang's RotaryEmbedding before the backend."""
    batch = fx.forward_batch if batch is None else batch
    hidden = fx.input_hidden if hidden is None else hidden
    module = fx.actual_module
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(batch)
        q, k, v = module.project_qkv(hidden)
        q, k = sglang_rotate(rotary, batch.positions, q, k)
        return module.o_proj(module.attn(q, k, v, batch))


@torch.no_grad()
def write_prefix(fx, batch, prefix_hidden, rotary=None) -> None:
    """The prefixes' keys in the pool: rotated at their positions (normal path, rotary given) or
    pre-RoPE (extrapolation)."""
    module, pool = fx.actual_module, fx.runner.token_to_kv_pool
    r2t = fx.runner.req_to_token_pool.req_to_token
    for b, hidden in enumerate(prefix_hidden):
        n = hidden.shape[0]
        if n == 0:
            continue
        q, k, v = module.project_qkv(hidden)
        if rotary is not None:
            _, k = sglang_rotate(rotary, torch.arange(n, device=hidden.device), q, k)
        slots = r2t[int(batch.req_pool_indices[b]), :n].long()
        pool.set_kv_buffer(module.attn, slots, k.view(n, module.num_kv_heads, module.head_dim),
                           v.view(n, module.num_kv_heads, module.head_dim))


def normal_and_extrapolated(fx, normal_cfg, extra_cfg, backend_cls=TokenSelectTorchBackend, native_cls=None):
    """(normal path over rotated keys, the parent backend over them, extrapolation over pre-RoPE
    keys, the extrapolating backend) for the fixture's batch."""
    rotary = rotary_for_tests(fx.input_hidden.device)
    write_prefix(fx, fx.forward_batch, fx.prefix_hidden, rotary)
    normal = roped_forward(fx, backend_cls(fx.runner, normal_cfg), rotary)
    native = roped_forward(fx, (native_cls or TorchNativeAttnBackend)(fx.runner), rotary)
    write_prefix(fx, fx.forward_batch, fx.prefix_hidden)
    backend = backend_cls(fx.runner, extra_cfg, rope=ROPE)
    return normal, native, roped_forward(fx, backend, rotary), backend


@pytest.mark.parametrize("prefix, heads", [((7, 30, 100), (4, 4)), ((1, 17, 60, 120), (8, 2))], ids=["mha", "gqa"])
def test_decode_with_budget_covering_context_equals_normal_path(prefix, heads):
    run = build(decode_case(prefix, *heads, name="x_decode"), fresh_seed())
    fx = run.fixture
    normal, native, extrapolated, backend = normal_and_extrapolated(
        fx, TokenSelectConfig(**WIDE), TokenSelectConfig(**WIDE, sparse_prefill=True, prefill_chunk=8, extrapolate=True))
    torch.testing.assert_close(normal, native, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    torch.testing.assert_close(extrapolated, normal, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    # the current token's key went into the pool pre-RoPE
    module = fx.actual_module
    k_raw = module.project_qkv(fx.input_hidden)[1].view(-1, module.num_kv_heads, module.head_dim)
    stored = fx.runner.token_to_kv_pool.get_key_buffer(0)[fx.forward_batch.out_cache_loc.long()]
    torch.testing.assert_close(stored.float(), k_raw.float(), atol=5e-3, rtol=5e-3, msg=f"seed {run.seed}")


@pytest.mark.parametrize("prefix, extend, heads", [
    ((0, 5, 20), (9, 3, 1), (4, 4)),
    ((4, 0, 33), (12, 70, 40), (6, 2)),
], ids=["mha", "gqa"])
def test_extend_with_budget_covering_context_equals_normal_path(prefix, extend, heads):
    """Normal path: dense extend over rotated keys. Extrapolation: every extend goes through the
    sub-chunk path with RoPE over list positions (here the true positions)."""
    run = build(extend_case(prefix, extend, *heads, name="x_extend"), fresh_seed())
    fx = run.fixture
    normal, native, extrapolated, backend = normal_and_extrapolated(
        fx, TokenSelectConfig(**WIDE), TokenSelectConfig(**WIDE, sparse_prefill=True, prefill_chunk=8, extrapolate=True))
    assert backend.ts_prefill is not None and not backend.ts_prefill.plan.sparse
    torch.testing.assert_close(normal, native, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    torch.testing.assert_close(extrapolated, normal, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


def selected_positions(backend, fx, b) -> torch.Tensor:
    """Logical positions request b attends (decode), from the backend's kv_indices."""
    step, batch = backend.ts_step, fx.forward_batch
    r2t = fx.runner.req_to_token_pool.req_to_token[int(batch.req_pool_indices[b])]
    slot_to_pos = {int(s): p for p, s in enumerate(r2t[: int(batch.seq_lens[b])].tolist())}
    slots = step.kv_indices[int(step.kv_indptr[b]) : int(step.kv_indptr[b + 1])]
    return torch.tensor([slot_to_pos[int(s)] for s in slots])


def test_small_budget_decode_attends_rope_over_list_positions():
    """Past the budget: the selection scores q rotated to n_local against pre-RoPE keys (checked
    by value threshold against this file's votes), attention rotates the listed keys to 0..m-1
    and the query to m - 1 (this file's complex rotation)."""
    case = decode_case((9, 40, 90), 4, 2, name="x_sparse")
    run = build(case, fresh_seed())
    fx, seed = run.fixture, run.seed
    cfg = TokenSelectConfig(**SMALL, sparse_prefill=True, prefill_chunk=4, extrapolate=True)
    rotary = rotary_for_tests()
    write_prefix(fx, fx.forward_batch, fx.prefix_hidden)
    backend = TokenSelectTorchBackend(fx.runner, cfg, rope=ROPE)
    actual = roped_forward(fx, backend, rotary)
    m = fx.reference_module
    outs = []
    for b, (q, keys, values) in enumerate(decode_request_qkv(fx)):
        q = q[None]  # [1, H_q, D]: complex_rotate's leading position axis
        length = keys.shape[0]
        chosen = selected_positions(backend, fx, b)
        if length <= cfg.budget:
            assert torch.equal(chosen, torch.arange(length)), f"seed {seed}"
        else:
            assert torch.equal(chosen[: cfg.n_init], torch.arange(cfg.n_init))
            assert torch.equal(chosen[-cfg.n_local :], torch.arange(length - cfg.n_local, length))
            q_sel = complex_rotate(q, torch.tensor([cfg.n_local]), THETA, SCALE)[0].float()
            cand = torch.arange(cfg.n_init, length - cfg.n_local)
            votes = torch.softmax(torch.einsum("hd,jhd->hj", q_sel, keys[cand]), 1).sum(0)
            picked = chosen[cfg.n_init : -cfg.n_local] - cfg.n_init
            kth = votes.topk(cfg.topk).values[-1]
            assert votes[picked].min() >= kth - 2e-2 * kth, f"a chosen vote is below the k-th, seed {seed}"
            assert set((votes > kth + 2e-2 * kth).nonzero().flatten().tolist()) <= set(picked.tolist()), f"seed {seed}"
        n = chosen.numel()
        k_list = complex_rotate(keys[chosen], torch.arange(n), THETA, SCALE).float()
        q_at = complex_rotate(q, torch.tensor([n - 1]), THETA, SCALE)[0].float()
        probs = torch.softmax(torch.einsum("hd,jhd->hj", q_at, k_list) * m.scaling, 1)
        outs.append(torch.einsum("hj,jhd->hd", probs, values[chosen]).reshape(-1))
    expected = m.reconstruct_output(torch.stack(outs).to(fx.input_hidden.device, fx.input_hidden.dtype))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    assert backend.selection_cache.counts()["misses"] == 2


def test_radix_prefix_written_by_another_request_is_reused():
    """Request A prefills 40 tokens (the backend writes their keys pre-RoPE); request B shares A's
    first 32 tokens through the radix cache (the same slots) and extends 12 of its own: B's output
    equals B prefilled from scratch. Positions never enter the pool, so shared keys stay valid.
    (32 is on the sub-chunk grid: a boundary inside a sub-chunk selects it as two pieces.)"""
    seed = fresh_seed()
    run = build(extend_case((0,), (40,), 4, 2, name="x_radix_a"), seed, runner_batch_size=2)
    fx = run.fixture
    cfg = TokenSelectConfig(**SMALL, sparse_prefill=True, prefill_chunk=4, extrapolate=True)
    rotary = rotary_for_tests()
    gen = torch.Generator().manual_seed(seed + 1)
    hidden_size = fx.input_hidden.shape[1]
    a_prompt = torch.randn(40, hidden_size, generator=gen).to(fx.input_hidden.dtype)
    b_suffix = torch.randn(12, hidden_size, generator=gen).to(fx.input_hidden.dtype)
    backend = TokenSelectTorchBackend(fx.runner, cfg, rope=ROPE)
    roped_forward(fx, backend, rotary, make_batch(fx, extend_case((0,), (40,), name="x_radix_a")), a_prompt)
    # B on row 0 with A's prefix slots (make_batch maps row 0's positions to the same slots)
    shared = roped_forward(fx, backend, rotary, make_batch(fx, extend_case((32,), (12,), name="x_radix_b")), b_suffix)
    # B from scratch on a fresh fixture: same weights (the kit seeds them from the case), fresh pool
    fresh_fx = build(extend_case((0,), (40,), 4, 2, name="x_radix_a"), seed, runner_batch_size=2).fixture
    fresh_backend = TokenSelectTorchBackend(fresh_fx.runner, cfg, rope=ROPE)
    whole = roped_forward(fresh_fx, fresh_backend, rotary, make_batch(fresh_fx, extend_case((0,), (44,), name="x_radix_b")),
                          torch.cat([a_prompt[:32], b_suffix]))
    torch.testing.assert_close(shared, whole[32:], atol=ATOL, rtol=RTOL, msg=f"seed {seed}")


# ----------------------------------------------------------------------------- refusals


def runner_with(*rotaries, head_dim=HEAD_DIM, hf_config=None):
    return SimpleNamespace(model=torch.nn.ModuleList(rotaries), model_config=SimpleNamespace(
        head_dim=head_dim, hf_text_config=hf_config))


def test_plain_and_linear_rope_are_served():
    assert rope_spec_of_runner(runner_with(sglang_rotary(theta=5e5, max_pos=8192), sglang_rotary(theta=5e5, max_pos=8192))) \
        == RopeSpec(HEAD_DIM, 5e5, 1.0, 8192)
    linear = sglang_rotary(sgl_rope.LinearScalingRotaryEmbedding, max_pos=2048, scaling_factors=[4.0])
    assert rope_spec_of_runner(runner_with(linear)) == RopeSpec(HEAD_DIM, 1e4, 4.0, 2048)


def _bare(class_name):
    """An instance of SGLang's rotary class of that name (fields only: refusal reads the class)."""
    import sglang.srt.layers.rotary_embedding as pkg

    cls = getattr(pkg, class_name, None)
    if cls is None:
        import importlib

        for mod in ("rope_variant", "yarn", "mrope"):
            cls = getattr(importlib.import_module(f"sglang.srt.layers.rotary_embedding.{mod}"), class_name, None) or cls
    return sglang_rotary(cls)


@pytest.mark.parametrize("rotary, needle", [
    (lambda: _bare("Llama3RotaryEmbedding"), r"llama3-style RoPE scaling \(Llama3RotaryEmbedding\)"),
    (lambda: _bare("YaRNScalingRotaryEmbedding"), "YaRN RoPE scaling"),
    (lambda: _bare("MRotaryEmbedding"), "multimodal RoPE"),
    (lambda: _bare("DynamicNTKScalingRotaryEmbedding"), "dynamic NTK"),
    (lambda: sglang_rotary(rotary_dim=HEAD_DIM // 2), f"partial rotary dims \\(rotary_dim {HEAD_DIM // 2} of head_dim"),
    (lambda: sglang_rotary(neox=False), "interleaved"),
    (lambda: sglang_rotary(sgl_rope.LinearScalingRotaryEmbedding, scaling_factors=[1.0, 4.0]), "several linear"),
], ids=["llama3", "yarn", "mrope", "ntk", "partial", "gptj", "multi_linear"])
def test_unsupported_rope_is_refused_in_one_line(rotary, needle):
    with pytest.raises(UnsupportedConfigError, match=needle) as exc:
        rope_spec_of_runner(runner_with(rotary()))
    text = str(exc.value)
    assert text.startswith("--tokenselect-extrapolate cannot serve this model: ") and "\n" not in text


def test_layers_with_different_rope_and_models_without_rope_are_refused():
    with pytest.raises(UnsupportedConfigError, match="layers apply different RoPE"):
        rope_spec_of_runner(runner_with(sglang_rotary(theta=1e4), sglang_rotary(theta=1e6)))
    with pytest.raises(UnsupportedConfigError, match="no rope_theta"):
        rope_spec_of_runner(runner_with(hf_config=SimpleNamespace(hidden_size=64, num_attention_heads=4)))


@pytest.mark.parametrize("params, needle", [
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3-style RoPE scaling"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "YaRN"),
    ({"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}, "multimodal RoPE"),
], ids=["llama3", "yarn", "mrope"])
def test_hf_configs_with_unsupported_rope_are_refused(params, needle):
    config = SimpleNamespace(rope_parameters=params, head_dim=64, max_position_embeddings=8192)
    with pytest.raises(UnsupportedRopeError, match=needle):
        rope_spec_of_hf_config(config)


def test_hf_configs_with_plain_linear_or_partial_rope():
    smollm2 = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e5}, head_dim=64,
                              max_position_embeddings=8192)
    assert rope_spec_of_hf_config(smollm2) == RopeSpec(64, 1e5, 1.0, 8192)
    v4 = SimpleNamespace(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}, hidden_size=256,
                         num_attention_heads=4, max_position_embeddings=4096)
    assert rope_spec_of_hf_config(v4) == RopeSpec(64, 1e4, 2.0, 4096)
    with pytest.raises(UnsupportedRopeError, match="partial rotary dims"):
        rope_spec_of_hf_config(SimpleNamespace(rope_theta=1e4, partial_rotary_factor=0.25, head_dim=64))


def test_the_kit_model_without_rope_and_a_budget_past_the_window_are_refused():
    run = build(decode_case((5,), name="x_refuse"), fresh_seed())
    cfg = TokenSelectConfig(**SMALL, sparse_prefill=True, prefill_chunk=4, extrapolate=True)
    with pytest.raises(UnsupportedConfigError, match="no rope_theta"):
        TokenSelectTorchBackend(run.fixture.runner, cfg)  # the kit's config describes no RoPE
    with pytest.raises(UnsupportedConfigError, match=r"budget .* \(16\) within the model's trained context \(8 tokens\)"):
        TokenSelectTorchBackend(run.fixture.runner, cfg, rope=RopeSpec(HEAD_DIM, 1e4, 1.0, max_position=8))
    assert math.isclose(TokenSelectTorchBackend(run.fixture.runner, cfg, rope=ROPE).ts_rope.scale, SCALE)
