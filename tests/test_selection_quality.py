"""Selection quality of the reference TokenSelect selection, on synthetic data (no model).

Keys a planted query strongly attends must survive the selection
(vote_scores_reference -> topk_positions_reference -> selection_positions), for GQA, MHA
and MQA shapes and both score scales; and a constructed case shows what the head soft
vote buys over the plain head sum: a key that only one head wants.
Every test draws fresh random inputs (the seed is printed on failure).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from sglang_tokenselect import TokenSelectConfig
from sglang_tokenselect.kernels.reference import (
    assemble_kv_indices_reference,
    kv_indptr_reference,
    selection_positions,
    topk_positions_reference,
    vote_scores_reference,
)

SHAPES = [  # (H_q, H_kv, D)
    (9, 3, 64),  # SmolLM2-135M (GQA, group 3)
    (32, 8, 128),  # Llama-3-8B (GQA, group 4)
    (8, 8, 64),  # MHA
    (8, 1, 64),  # MQA
]


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _paged(keys_per_req: list[torch.Tensor], gen: torch.Generator):
    """Scatter each request's keys [L, H_kv, D] into a shuffled slot buffer."""
    lens = [k.shape[0] for k in keys_per_req]
    total = sum(lens) + 7
    perm = torch.randperm(total, generator=gen)
    k_buffer = torch.randn(total, *keys_per_req[0].shape[1:], generator=gen)
    width = max(lens)
    req_to_token = torch.zeros(len(lens) + 1, width, dtype=torch.int64)
    start = 0
    for b, keys in enumerate(keys_per_req):
        slots = perm[start : start + lens[b]]
        req_to_token[b + 1, : lens[b]] = slots  # row 0 unused: pool rows != batch index
        k_buffer[slots] = keys
        start += lens[b]
    req_pool_indices = torch.arange(1, len(lens) + 1)
    return k_buffer, req_to_token, req_pool_indices, torch.tensor(lens)


def _select(q, k_buffer, req_to_token, req_pool_indices, seq_lens, cfg: TokenSelectConfig, scale):
    votes = vote_scores_reference(
        q, k_buffer, req_to_token, req_pool_indices, seq_lens,
        n_init=cfg.n_init, n_local=cfg.n_local, scale=scale, vote=cfg.vote,
    )
    topk = topk_positions_reference(votes, seq_lens, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk)
    return [
        selection_positions(topk[b], int(seq_lens[b]), n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk)
        for b in range(q.shape[0])
    ], topk


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Hq{s[0]}-Hkv{s[1]}-D{s[2]}")
@pytest.mark.parametrize("score_scale", [1.0, None], ids=["scale1", "scale_layer"])
def test_planted_keys_are_selected(shape, score_scale, seed):
    """Keys equal to a scaled copy of one query head are kept by the head soft vote."""
    h_q, h_kv, d = shape
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    # topk >= H_q + planted: with score scale 1 every head's softmax is ~one-hot, so each
    # head also casts ~1 vote for its own (random) best key.
    cfg = TokenSelectConfig(n_init=8, n_local=32, topk=48, score_scale=score_scale, vote="soft")
    scale = cfg.scale_for(1.0 / math.sqrt(d))
    heads = [h // (h_q // h_kv) for h in range(h_q)]  # the spec's GQA mapping, spelled out
    batch = 3
    lens = [rng.randrange(1500, 3000) for _ in range(batch)]
    q = torch.randn(batch, h_q, d, generator=gen)
    keys_per_req, planted_per_req = [], []
    for b in range(batch):
        keys = torch.randn(lens[b], h_kv, d, generator=gen)
        n_planted = rng.randrange(2, 7)
        planted = rng.sample(range(cfg.n_init, lens[b] - cfg.n_local), n_planted)
        for p in planted:
            h = rng.randrange(h_q)  # the one query head this key is planted for
            # Unit direction of q_h, scaled so q_h . k = 2.5 sqrt(d) |q_h|, while background
            # scores q_h . k_random have std |q_h| (max ~4 |q_h| over a few thousand keys).
            keys[p, heads[h]] = q[b, h] / q[b, h].norm() * 2.5 * math.sqrt(d)
        keys_per_req.append(keys)
        planted_per_req.append(sorted(planted))
    paged = _paged(keys_per_req, gen)
    selections, topk = _select(q, *paged, cfg, scale)
    for b in range(batch):
        sel = selections[b].tolist()
        assert len(sel) == cfg.budget == len(set(sel)), f"seed={seed}"
        assert sel[: cfg.n_init] == list(range(cfg.n_init))
        assert sel[-cfg.n_local :] == list(range(lens[b] - cfg.n_local, lens[b]))
        missing = set(planted_per_req[b]) - set(sel)
        assert not missing, f"seed={seed} request {b}: planted {planted_per_req[b]} lost {sorted(missing)}"
        assert topk[b].tolist() == sorted(topk[b].tolist())
    # The physical slots follow the logical selection through req_to_token.
    k_buffer, req_to_token, req_pool_indices, seq_lens = paged
    indptr = kv_indptr_reference(seq_lens, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk)
    kv_indices = torch.full((int(indptr[-1]),), -1, dtype=torch.int64)
    assemble_kv_indices_reference(
        topk, req_to_token, req_pool_indices, seq_lens, indptr, kv_indices,
        n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk,
    )
    for b in range(batch):
        got = kv_indices[int(indptr[b]) : int(indptr[b + 1])]
        assert torch.equal(got, req_to_token[b + 1, selections[b]])


def test_short_context_is_dense(seed):
    rng = random.Random(seed)
    cfg = TokenSelectConfig(n_init=4, n_local=16, topk=32)
    n = rng.randrange(1, cfg.budget + 1)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, 2, 16, generator=gen)
    q = torch.randn(1, 4, 16, generator=gen)
    sel, topk = _select(q, *_paged([keys], gen), cfg, 0.25)
    assert sel[0].tolist() == list(range(n))
    assert (topk == -1).all()


def _keys_with_scores(q_group: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A key k with q_h . k = targets[h] for every query head h of one KV group (min norm)."""
    return torch.linalg.pinv(q_group) @ targets


@pytest.mark.parametrize("shape", [(9, 3, 64), (8, 8, 64)], ids=["gqa", "mha"])
def test_soft_vote_keeps_a_key_only_one_head_wants(shape, seed):
    """One head wants key p very much, the other heads mildly dislike it, and a crowd of
    ``topk`` + 8 keys is mildly liked by every head.

    Summed raw scores: p gets ``b - c (H - 1)`` (12 - 8 = 4 for H = 9), each crowd key
    ``a H`` (27), so the plain sum fills its top-k with the crowd and drops p. Per-head
    softmax: p takes most of its head's probability mass (~1) while a crowd key gets
    ``e^a / Z`` (~0.01) in each head, so the head soft vote keeps p. Background keys score
    ~N(0, 0.3^2) in every head.
    """
    h_q, h_kv, d = shape
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cfg = TokenSelectConfig(n_init=4, n_local=16, topk=16, score_scale=None)
    scale = 1.0 / math.sqrt(d)
    a, b_want, c_dislike = 3.0, 12.0, 1.0  # targets of the *scaled* scores
    group = h_q // h_kv
    heads = torch.arange(h_q) // group
    length = rng.randrange(2000, 3000)
    q = torch.randn(h_q, d, generator=gen)
    # Background: scaled scores ~ N(0, 0.3^2) (|q_h| ~ sqrt(d), scale 1/sqrt(d)).
    keys = torch.randn(length, h_kv, d, generator=gen) * 0.3
    candidates = range(cfg.n_init, length - cfg.n_local)
    chosen = rng.sample(candidates, cfg.topk + 9)
    p, crowd = chosen[0], chosen[1:]
    owner = rng.randrange(h_q)
    for g in range(h_kv):
        q_group = q[g * group : (g + 1) * group]
        for pos in crowd:
            keys[pos, g] = _keys_with_scores(q_group, torch.full((group,), a / scale))
        want = torch.full((group,), -c_dislike / scale)
        if heads[owner] == g:
            want[owner - g * group] = b_want / scale
        keys[p, g] = _keys_with_scores(q_group, want)

    # The construction holds: check the scaled scores it promises.
    scores = torch.einsum("hd,nhd->hn", q, keys[:, heads, :]) * scale
    assert scores[owner, p] == pytest.approx(b_want, abs=1e-3)
    assert torch.allclose(scores[:, crowd], torch.full((h_q, len(crowd)), a), atol=1e-3)

    paged = _paged([keys], gen)
    soft = TokenSelectConfig(n_init=4, n_local=16, topk=16, score_scale=None, vote="soft")
    plain = TokenSelectConfig(n_init=4, n_local=16, topk=16, score_scale=None, vote="sum")
    (sel_soft,), _ = _select(q[None], *paged, soft, scale)
    (sel_sum,), _ = _select(q[None], *paged, plain, scale)
    assert p in sel_soft.tolist(), f"seed={seed}: soft vote lost the key head {owner} wants"
    assert p not in sel_sum.tolist(), f"seed={seed}: construction broken, sum kept it"
    # Both still pick crowd keys for the remaining slots.
    assert len(set(crowd) & set(sel_soft.tolist())) == cfg.topk - 1
    assert len(set(crowd) & set(sel_sum.tolist())) == cfg.topk
