"""Selector: GQA head pairing and the Selection Cache, with hand-built keys."""

from __future__ import annotations

import pytest
import torch

from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.selection import SelectionCache, Selector, TorchSelectionOps

D = 8


def make_selector(cfg: TokenSelectConfig, num_rows=4, num_heads=4) -> Selector:
    cache = SelectionCache.allocate(num_layers=2, num_rows=num_rows, query_width=num_heads * D,
                                    topk=cfg.topk, dtype=torch.float32, device="cpu")
    return Selector(cfg, cache, TorchSelectionOps())


class Batch:
    """One request on pool row 2 with context ``length``, slots scattered over the buffer."""

    def __init__(self, keys: torch.Tensor, gen: torch.Generator):
        length = keys.shape[0]
        self.slots = torch.randperm(3 * length, generator=gen)[:length].int()
        self.k_buffer = torch.randn(3 * length, keys.shape[1], D, generator=gen)
        self.k_buffer[self.slots.long()] = keys
        self.req_to_token = torch.zeros(4, 3 * length, dtype=torch.int32)
        self.req_to_token[2, :length] = self.slots
        self.rows = torch.tensor([2])
        self.seq_lens = torch.tensor([length])

    def select(self, selector: Selector, q: torch.Tensor, layer=0) -> set[int]:
        """Run one step; return the attended logical positions."""
        cfg = selector.config
        n = int(ref.selected_lens(self.seq_lens, cfg.n_init, cfg.n_local, cfg.topk))
        indptr = torch.tensor([0, n], dtype=torch.int32)
        indices = torch.full((n,), -7, dtype=torch.int32)
        scratch = selector.ops.alloc_scratch(1, None, q.shape[0], "cpu")
        selector.select(layer, q[None], self.k_buffer, self.req_to_token, self.rows, self.seq_lens,
                        indptr, indices, scale=1.0, scratch=scratch)
        assert (indices >= 0).all(), "every kv_indices element must be written"
        slot_to_pos = {int(s): p for p, s in enumerate(self.slots)}
        positions = [slot_to_pos[int(s)] for s in indices]
        assert len(set(positions)) == len(positions), "a position was attended twice"
        return set(positions)


def spike_keys(length: int, gen: torch.Generator, spikes: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """[length, 2, D] small random keys with ``spikes[(position, kv_head)] = key``."""
    keys = 0.05 * torch.randn(length, 2, D, generator=gen)
    for (pos, head), key in spikes.items():
        keys[pos, head] = key
    return keys


def test_gqa_query_head_reads_kv_head_h_div_group():
    """4 query heads on 2 KV heads: heads 0,1 read KV head 0 and heads 2,3 KV head 1.

    Heads 0,1 look along e0, heads 2,3 along e1. KV head 0 has an e0 spike at position 10;
    KV head 1 an e1 spike at 20 and an e0 spike at 30. With g(h) = h // 2 the vote picks
    {10, 20}; the original code's h % 2 would send head 1 (e0) to KV head 1 and pick 30.
    """
    gen = torch.Generator().manual_seed(7)
    e0, e1 = torch.eye(D)[0] * 10, torch.eye(D)[1] * 10
    keys = spike_keys(48, gen, {(10, 0): e0, (20, 1): e1, (30, 1): e0})
    q = torch.stack([e0, e0, e1, e1])
    cfg = TokenSelectConfig(n_init=2, n_local=4, topk=2, cache_threshold=1.0)
    batch = Batch(keys, gen)
    expected = {0, 1} | {10, 20} | set(range(44, 48))
    assert batch.select(make_selector(cfg), q) == expected

    votes = ref.vote_from_scores(ref.head_scores_reference(q, keys, 1.0), "soft")
    assert votes[10 - 0] > 1.9 and votes[20] > 1.9 and votes[30] < 0.1


def test_head_soft_vote_is_sum_of_per_head_softmax():
    gen = torch.Generator().manual_seed(11)
    q, keys = torch.randn(6, D, generator=gen), torch.randn(40, 3, D, generator=gen)
    scores = ref.head_scores_reference(q, keys, 0.5)
    by_hand = torch.stack([
        torch.softmax(0.5 * keys[:, h // 2] @ q[h], dim=0) for h in range(6)
    ]).sum(0)
    torch.testing.assert_close(ref.vote_from_scores(scores, "soft"), by_hand)
    assert ref.vote_from_scores(scores, "soft").sum().item() == pytest.approx(6.0, rel=1e-5)


def _two_step_setup(threshold: float):
    """Step 1 sees spikes at 10 and 20; before step 2 they move to 30 and 35."""
    gen = torch.Generator().manual_seed(int(threshold * 1000) + 3)
    e0 = torch.eye(D)[0] * 10
    cfg = TokenSelectConfig(n_init=2, n_local=4, topk=2, cache_threshold=threshold)
    selector = make_selector(cfg)
    keys = spike_keys(48, gen, {(10, 0): e0, (20, 1): e0})
    batch = Batch(keys, gen)
    q = torch.stack([e0, e0, e0, e0])
    first = batch.select(selector, q)
    assert first == {0, 1, 10, 20} | set(range(44, 48))
    moved = spike_keys(49, gen, {(30, 0): e0, (35, 1): e0})
    batch2 = Batch(moved, gen)
    return selector, batch2, q


def test_cache_hit_reuses_the_cached_positions_with_the_current_local_window():
    selector, batch, q = _two_step_setup(threshold=0.9)
    similar = q + 0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    assert torch.nn.functional.cosine_similarity(similar.flatten(), q.flatten(), dim=0) > 0.9
    second = batch.select(selector, similar)
    assert second == {0, 1, 10, 20} | set(range(45, 49))  # cached top-k, local window moved on
    assert selector.cache.counts() == {"hits": 1, "misses": 1, "dense": 0, "overflow": 0}
    assert selector.cache.counters[:, 0].tolist() == [1, 0]  # hits, counted per layer


def test_cache_miss_recomputes():
    selector, batch, _ = _two_step_setup(threshold=0.9)
    e0, e3 = torch.eye(D)[0] * 10, torch.eye(D)[3] * 10
    other = torch.stack([e0, e0, (e0 + e3) / 2**0.5, (e0 + e3) / 2**0.5])  # cos 0.854 to q
    second = batch.select(selector, other)
    assert {30, 35} <= second and not {10, 20} & second
    assert selector.cache.counts() == {"hits": 0, "misses": 2, "dense": 0, "overflow": 0}


def test_threshold_one_never_hits():
    selector, batch, q = _two_step_setup(threshold=1.0)
    second = batch.select(selector, q.clone())  # the very same query
    assert {30, 35} <= second
    assert selector.cache.counts() == {"hits": 0, "misses": 2, "dense": 0, "overflow": 0}


def test_threshold_minus_one_reuses_any_valid_selection():
    """Static selection: after the first miss every step reuses it, however far q moves."""
    selector, batch, _ = _two_step_setup(threshold=-1.0)
    opposite = -torch.stack([torch.eye(D)[0] * 10] * 4)  # cos -1 to the cached query
    second = batch.select(selector, opposite)
    assert second == {0, 1, 10, 20} | set(range(45, 49))
    assert selector.cache.counts() == {"hits": 1, "misses": 1, "dense": 0, "overflow": 0}


def test_cache_state_is_per_layer_and_per_row():
    selector, batch, q = _two_step_setup(threshold=0.9)
    batch.select(selector, q, layer=1)  # layer 1 has no cached selection yet: a miss
    assert selector.cache.counters[:, 0].tolist() == [0, 0] and selector.cache.counters[:, 1].tolist() == [1, 1]
    assert selector.cache.valid[:, 2].all() and not selector.cache.valid[:, [0, 1, 3]].any()
    selector.cache.invalidate_rows(torch.tensor([2]))
    assert not selector.cache.valid.any()
