"""Drafter backbone: context injection, incremental cache, batching, non-causal block."""

import numpy as np
import pytest
import torch
from transformers import Gemma4TextConfig

from dspark_vllm.checkpoint import build_random_drafter


def _drafter(target, **kw):
    kw = {"num_layers": 2, "block_size": 4, "markov_rank": 8, "target_layer_ids": [0, 2]} | kw
    return build_random_drafter(target, **kw)


def _features(n, t, width, seed=0):
    return torch.randn(n, t, width, generator=torch.Generator().manual_seed(seed))


def test_incremental_context_equals_one_shot(tiny_qwen3):
    d = _drafter(tiny_qwen3)
    feats = _features(1, 9, 2 * 64)
    one = d.new_cache(1)
    d.add_context(one, feats, torch.tensor([9]))
    inc = d.new_cache(1, capacity=2)  # also exercises growth
    for a, b in [(0, 4), (4, 5), (5, 9)]:
        d.add_context(inc, feats[:, a:b], torch.tensor([b - a]))
    anchor = torch.tensor([7])
    torch.testing.assert_close(d.forward_block(anchor, inc), d.forward_block(anchor, one))


def test_batched_rows_are_independent(tiny_qwen3):
    d = _drafter(tiny_qwen3)
    lens = [3, 7]
    feats = _features(2, 7, 2 * 64)
    batch = d.new_cache(2)
    d.add_context(batch, feats, torch.tensor(lens))
    anchors = torch.tensor([5, 9])
    h_batch = d.forward_block(anchors, batch)
    for r, n in enumerate(lens):
        single = d.new_cache(1)
        d.add_context(single, feats[r:r + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(h_batch[r], d.forward_block(anchors[r:r + 1], single)[0], atol=1e-5, rtol=1e-5)


def test_block_kv_in_spare_slots_equals_concatenation_and_leaves_the_context_intact(tiny_qwen3):
    """The block's K/V written into free cache slots (a view with spare slots, or the cache
    itself) give the same states as concatenating them to a copy of the context, and drafting
    leaves nothing behind: the next context append and draft match a cache never drafted from."""
    d = _drafter(tiny_qwen3)
    feats = _features(3, 6, 2 * 64)
    cache, fresh = d.new_cache(3, capacity=6), d.new_cache(3, capacity=6)
    for c in (cache, fresh):
        d.add_context(c, feats[:, :5], torch.tensor([5, 2, 4]))
    rows, anchors = torch.tensor([2, 0]), torch.tensor([5, 9])
    concat = d.forward_block(anchors, cache.view(rows))  # exactly as long as the context: no room
    spare = cache.view(rows, spare=4)
    assert spare.keys[0].shape[2] == 5 + 4 and cache.capacity >= 9  # the cache grew to give the view its slots
    torch.testing.assert_close(d.forward_block(anchors, spare), concat, rtol=0, atol=0)
    all_rows = torch.tensor([9, 0, 5])
    torch.testing.assert_close(d.forward_block(all_rows, cache),  # in place, in the cache itself
                               d.forward_block(all_rows, cache.view(torch.arange(3))), rtol=0, atol=0)
    shared = cache.view(torch.tensor([1, 2]), spare=4)  # consecutive rows: a slice, not a copy
    assert shared.keys[0].data_ptr() == cache.keys[0][1:].data_ptr()
    gathered = cache.view(torch.tensor([2, 1]), spare=4)  # any other order: a gathered copy
    assert gathered.keys[0].data_ptr() != cache.keys[0][2:].data_ptr()
    torch.testing.assert_close(d.forward_block(anchors, shared), d.forward_block(anchors.flip(0), gathered).flip(0),
                               rtol=0, atol=0)
    for c in (cache, fresh):
        d.add_context(c, feats[:, 5:6], torch.tensor([1, 1, 1]))
    torch.testing.assert_close(d.forward_block(torch.tensor([1, 2, 3]), cache),
                               d.forward_block(torch.tensor([1, 2, 3]), fresh), rtol=0, atol=0)


def test_context_changes_drafts_and_block_is_non_causal(tiny_qwen3):
    d = _drafter(tiny_qwen3)
    cache = d.new_cache(1)
    d.add_context(cache, _features(1, 5, 128), torch.tensor([5]))
    h = d.forward_block(torch.tensor([3]), cache)
    other = d.new_cache(1)
    d.add_context(other, _features(1, 5, 128, seed=1), torch.tensor([5]))
    assert not torch.allclose(h, d.forward_block(torch.tensor([3]), other))
    # Non-causal: position 0 attends to the mask slots after it, so changing the mask token
    # embedding changes h_0 (a causal block would leave it unchanged).
    with torch.no_grad():
        d.embed_tokens.weight[d.config.mask_token_id] += 1.0
    h2 = d.forward_block(torch.tensor([3]), cache)
    assert not torch.allclose(h[:, 0], h2[:, 0])


def test_gemma4_backbone_softcaps_before_markov_bias():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                           num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                           final_logit_softcapping=2.0, layer_types=["full_attention"] * 3)
    target = AutoModelForCausalLM.from_config(cfg)
    d = _drafter(target, target_layer_ids=[0, 1])
    assert d.family == "gemma4" and d.layers[0].self_attn.v_proj is None
    cache = d.new_cache(1)
    d.add_context(cache, _features(1, 4, 64), torch.tensor([4]))
    h = d.forward_block(torch.tensor([1]), cache)
    base = d.base_logits(h)
    assert base.abs().max() <= 2.0  # soft-capped U
    with torch.no_grad():
        d.markov_head.markov_w2.weight.mul_(100.0)
    block = d.propose(torch.tensor([1]), cache, torch.ones(1), torch.Generator().manual_seed(0))
    assert block.probs is not None
    z0 = base[0, 0] + d.markov_head.step_bias(h[:, 0], torch.tensor([1]), None)[0][0]
    assert z0.abs().max() > 2.0  # the bias is added after the cap, not capped itself
    torch.testing.assert_close(block.probs[0, 0], torch.softmax(z0, -1))


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_propose_shapes(tiny_qwen3, head_type):
    d = _drafter(tiny_qwen3, markov_head_type=head_type)
    cache = d.new_cache(3)
    d.add_context(cache, _features(3, 6, 128), torch.tensor([6, 2, 4]))
    block = d.propose(torch.tensor([1, 2, 3]), cache, torch.tensor([0.0, 1.0, 0.5]), torch.Generator().manual_seed(0))
    assert block.tokens.shape == (3, 4) and block.probs.shape == (3, 4, 128)
    conf = torch.sigmoid(block.confidence_logits)
    assert conf.shape == (3, 4) and ((conf > 0) & (conf < 1)).all()
    torch.testing.assert_close(block.probs.sum(-1), torch.ones(3, 4))


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("fused", [False, True])
def test_draft_vocabulary_keeps_greedy_drafts_it_contains(tiny_qwen3, head_type, fused):
    """A draft vocabulary holding every full-vocabulary greedy draft yields the same drafts and
    confidences (in any id order); sampled drafts stay inside it and q is zero outside it."""
    d = _drafter(tiny_qwen3, markov_head_type=head_type)
    cache = d.new_cache(3)
    d.add_context(cache, _features(3, 6, 2 * 64), torch.tensor([6, 4, 5]))
    anchor, greedy = torch.tensor([3, 17, 90]), torch.zeros(3)
    full = d.propose(anchor, cache, greedy, fused=fused, seeds=torch.arange(3))
    others = torch.randperm(d.config.vocab_size, generator=torch.Generator().manual_seed(1))[:20]
    subset = torch.cat([full.tokens.flatten(), others]).unique()
    d.set_draft_vocab(subset[torch.randperm(len(subset), generator=torch.Generator().manual_seed(2))])
    sub = d.propose(anchor, cache, greedy, fused=fused, seeds=torch.arange(3))
    assert torch.equal(sub.tokens, full.tokens)
    torch.testing.assert_close(sub.confidence_logits, full.confidence_logits)
    sampled = d.propose(anchor, cache, torch.ones(3), fused=fused, seeds=torch.arange(3),
                        generator=torch.Generator().manual_seed(0))
    assert torch.isin(sampled.tokens, subset).all()
    outside = ~torch.isin(torch.arange(d.config.vocab_size), subset)
    assert sampled.probs.shape[-1] == d.config.vocab_size
    assert float(sampled.probs[..., outside].abs().max()) == 0.0
    torch.testing.assert_close(sampled.probs.sum(-1), torch.ones(3, d.block_size))
    picked = sampled.probs.gather(-1, sampled.tokens[..., None])
    assert bool((picked > 0).all())


@pytest.mark.parametrize("fused", [False, True])
def test_shallow_draft_is_the_block_of_that_size(tiny_qwen3, fused):
    """depth=D drafts exactly what the same weights give for a D-position block: the first D
    positions, attending to D-1 MASK positions (the gate drafts shallow under load)."""
    import copy

    d = _drafter(tiny_qwen3)
    cache = d.new_cache(3)
    d.add_context(cache, _features(3, 6, 2 * 64), torch.tensor([6, 4, 5]))
    anchor, temps = torch.tensor([3, 17, 90]), torch.tensor([0.0, 1.0, 0.7])
    for depth in (1, 2, d.block_size - 1):
        short = copy.deepcopy(d)
        short.config.raw["block_size"] = depth
        assert d.block_size == 4 and short.block_size == depth
        want = short.propose(anchor, cache, temps, torch.Generator().manual_seed(0), fused=fused,
                             seeds=torch.arange(3))
        got = d.propose(anchor, cache, temps, torch.Generator().manual_seed(0), fused=fused, seeds=torch.arange(3),
                        depth=depth)
        assert got.tokens.shape == (3, depth) and torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.probs, want.probs)
        torch.testing.assert_close(got.confidence_logits, want.confidence_logits)
    full = d.propose(anchor, cache, torch.zeros(3), fused=fused, seeds=torch.arange(3))
    assert torch.equal(d.propose(anchor, cache, torch.zeros(3), fused=fused, seeds=torch.arange(3),
                                 depth=d.block_size).tokens, full.tokens)
    for bad in (0, d.block_size + 1):
        with pytest.raises(ValueError, match="draft depth"):
            d.propose(anchor, cache, torch.zeros(3), depth=bad)


def test_draft_vocabulary_rejects_bad_ids(tiny_qwen3):
    d = _drafter(tiny_qwen3)
    with pytest.raises(ValueError, match="in \\[0, 128\\)"):
        d.set_draft_vocab([0, 128])
    with pytest.raises(ValueError, match="distinct"):
        d.set_draft_vocab([1, 1])


def test_packed_context_equals_padded(tiny_qwen3):
    d = _drafter(tiny_qwen3)
    lens = [3, 0, 7]
    feats = _features(3, 7, 2 * 64)
    padded = d.new_cache(4)
    d.add_context(padded, feats, torch.tensor(lens), rows=torch.tensor([2, 0, 1]))
    packed = d.new_cache(4)
    flat = torch.cat([feats[r, :n] for r, n in enumerate(lens)])
    d.add_context_packed(packed, flat, torch.tensor(lens), rows=torch.tensor([2, 0, 1]))
    assert packed.lengths.tolist() == padded.lengths.tolist() == [0, 7, 3, 0]
    for a, b in zip(padded.keys + padded.values, packed.keys + packed.values):
        torch.testing.assert_close(a[:, :, :7], b[:, :, :7], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="counts sum"):
        d.add_context_packed(packed, flat[:5], torch.tensor(lens))


def _paged(d, lens, feats, page=4, seed=0):
    """A pool holding each request's context at shuffled pages, and the block-table rows."""
    pages = [-(-n // page) + 2 for n in lens]  # room for drafting past the context
    perm = torch.randperm(sum(pages) + 1, generator=torch.Generator().manual_seed(seed))
    perm = perm[perm != 0][: sum(pages)]  # page 0 stays unused, as vLLM's null block
    width = max(pages)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[at: at + n]
        at += n
    pool = d.new_pool((int(perm.max()) + 1) * page)
    for r, n in enumerate(lens):
        pos = torch.arange(n)
        slots = table[r].long()[pos // page] * page + pos % page
        pool.write(d.project_context(feats[r, :n], pos), slots)
    return pool, table


def test_paged_context_drafts_equal_the_dense_cache(tiny_qwen3, monkeypatch):
    """Context written at scattered slots and read back through block-table rows gives the
    same block states as the dense per-request cache, including a request attending only to
    a suffix of its positions, and in chunks when the gather budget is small."""
    from dspark_vllm.paged_context import PagedContextView

    d = _drafter(tiny_qwen3)
    lens = [9, 2, 6]
    feats = _features(3, 9, 2 * 64)
    dense = d.new_cache(3)
    d.add_context(dense, feats, torch.tensor(lens))
    pool, table = _paged(d, lens, feats)
    anchors = torch.tensor([5, 9, 4])
    view = PagedContextView(pool, table, 4, np.zeros(3, dtype=np.int64), np.array(lens))
    want = d.forward_block(anchors, dense)
    torch.testing.assert_close(d.forward_block(anchors, view), want, atol=1e-5, rtol=1e-5)
    chunks = list(view.chunks(spare=4, max_slots=20))
    assert [c.stop - c.start for c, _ in chunks] == [1, 2]  # 9 + 4 alone; 2 and 6 together: 2 x (6 + 4) <= 20
    monkeypatch.setattr("dspark_vllm.paged_context.MAX_GATHER_SLOTS", 20)
    seen = []
    monkeypatch.setattr(d, "_forward_view", lambda a, v, depth, real=d._forward_view: seen.append(v.batch) or real(a, v, depth))
    torch.testing.assert_close(d.forward_block(anchors, view), want, atol=1e-5, rtol=1e-5)
    assert seen == [1, 2]  # drafted in two chunks
    # a suffix: positions [3, 9) of request 0 equal a dense cache holding only those (RoPE is relative)
    suffix = d.new_cache(1)
    d.add_context(suffix, feats[:1, 3:9], torch.tensor([6]))
    tail = PagedContextView(pool, table[:1], 4, np.array([3]), np.array([9]))
    torch.testing.assert_close(d.forward_block(anchors[:1], tail), d.forward_block(anchors[:1], suffix),
                               atol=1e-5, rtol=1e-5)
    block = d.propose(anchors, view, torch.zeros(3), all_greedy=True)
    assert torch.equal(block.tokens, d.propose(anchors, dense, torch.zeros(3)).tokens)


def test_pending_context_flushes_equal_immediate_writes(tiny_qwen3):
    """Deferring context (queue per step, flush at draft time or at the backlog cap) must leave
    the pool exactly as writing every step at once would, whatever the flush schedule."""
    from dspark_vllm.pending_context import PendingContext

    d = _drafter(tiny_qwen3)
    gen = torch.Generator().manual_seed(3)
    eager, lazy = d.new_pool(64), d.new_pool(64)
    pending = PendingContext(d, lazy, max_tokens=6)
    lengths = [0, 0, 0]
    base = [0, 20, 40]  # each request's slots
    for step in range(12):
        counts = torch.randint(0, 4, (3,), generator=gen).tolist()
        counts[step % 3] = 9 if step == 0 else counts[step % 3]  # one prefill-sized chunk
        feats = torch.randn(sum(counts), 2 * 64, generator=gen)
        pos = torch.cat([torch.arange(lengths[r], lengths[r] + n) for r, n in enumerate(counts)])
        slots = torch.cat([base[r] + torch.arange(lengths[r], lengths[r] + n) for r, n in enumerate(counts)])
        lengths = [a + b for a, b in zip(lengths, counts)]
        eager.write(d.project_context(feats, pos), slots)
        pending.push_step([0, 1, 2], feats, counts, slots, pos)
        pending.flush([step % 3] + pending.full_keys() if step % 4 == 3 else pending.full_keys())
        assert all(pending.pending_tokens(r) < 6 for r in range(3))
    pending.flush()
    assert pending.total_tokens == 0
    for a, b in zip(lazy.keys + lazy.values, eager.keys + eager.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pending.push_step([1], torch.randn(2, 2 * 64), [2], torch.tensor([60, 61]), torch.tensor([0, 1]))
    pending.drop(1)
    assert pending.flush() == 0 and torch.equal(lazy.keys[0][60:62], eager.keys[0][60:62])


def test_pending_context_push_step_views_decode_steps_and_copies_minorities_of_big_ones(tiny_qwen3):
    """A decode-sized step is queued as views of the caller's tensors (no copies); in a step past
    VIEW_MAX_TOKENS a part under half of it is copied so it cannot pin the whole prefill."""
    from dspark_vllm.pending_context import PendingContext

    d = _drafter(tiny_qwen3)
    pending = PendingContext(d, d.new_pool(256))
    decode = torch.randn(3, 2 * 64)
    pending.push_step([0, 1, 2], decode, [1, 1, 1], torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert all(pending._parts[r][0][0].data_ptr() == decode[r].data_ptr() for r in range(3))
    big = PendingContext.VIEW_MAX_TOKENS + 8
    prefill = torch.randn(big + 2, 2 * 64)
    pending.push_step([0, 1, 2], prefill, [big, 0, 2], torch.arange(big + 2), torch.arange(big + 2))
    assert pending._parts[0][1][0].data_ptr() == prefill.data_ptr()  # the majority part: a view
    assert pending._parts[2][1][0].untyped_storage().data_ptr() != prefill.untyped_storage().data_ptr()
    torch.testing.assert_close(pending._parts[2][1][0], prefill[big:])
    assert len(pending._parts[1]) == 1 and pending.pending_tokens(1) == 1
    assert pending.total_tokens == 3 + big + 2
    with pytest.raises(ValueError, match="counts summing to 3 for 4 feature rows"):
        pending.push_step([0, 1], torch.randn(4, 2 * 64), [1, 2], torch.arange(4), torch.arange(4))


def test_pending_context_byte_budget_flushes_largest_backlogs_first(tiny_qwen3):
    from dspark_vllm.pending_context import PendingContext

    d = _drafter(tiny_qwen3)
    token_bytes = 2 * 64 * 4  # one float32 token of features
    pending = PendingContext(d, d.new_pool(64), max_tokens=1000, max_bytes=20 * token_bytes)
    counts = [2, 9, 5, 7]  # 23 tokens: over the 20-token budget
    pending.push_step([0, 1, 2, 3], torch.randn(23, 2 * 64), counts, torch.arange(23), torch.arange(23))
    assert pending.total_bytes == 23 * token_bytes
    assert pending.full_keys() == [1]  # 14 left <= 15 (3/4 of the budget)
    pending.max_bytes = 12 * token_bytes
    assert pending.full_keys() == [1, 3]  # 7 left <= 9
    assert pending.flush(pending.full_keys()) == 16
    assert pending.total_bytes == 7 * token_bytes
    pending.drop(0)
    assert pending.total_bytes == 5 * token_bytes and pending.full_keys() == []


def _long_context_drift(d32, d16, anchors, feats):
    """(max |base logits fp32 - bf16|, greedy blocks equal) over the anchors, one long context."""
    caches = []
    for d in (d32, d16):
        c = d.new_cache(1)
        d.add_context(c, feats.to(d.dtype), torch.tensor([feats.shape[1]]))
        caches.append(c)
    drift, same = 0.0, 0
    with torch.no_grad():
        for a in anchors:
            b32 = d32.base_logits(d32.forward_block(a[None], caches[0]))
            b16 = d16.base_logits(d16.forward_block(a[None], caches[1]))
            drift = max(drift, float((b32 - b16).abs().max()))
            same += int(torch.equal(d32.propose(a[None], caches[0], torch.zeros(1)).tokens,
                                    d16.propose(a[None], caches[1], torch.zeros(1)).tokens))
    return drift, same


def test_bf16_gemma4_drafts_match_float32_over_a_long_context(tmp_path):
    """Loaded in bf16 (the vLLM path), a Gemma4 drafter keeps its rotary frequencies in float32:
    over 3,000 context positions its base logits stay within bf16 noise of the float32 drafter
    and the greedy blocks agree. Negative control: the same drafter with its frequencies rounded
    to bf16 (what ``.to(bfloat16)`` used to do) drifts by several logit units."""
    from transformers import AutoModelForCausalLM

    from dspark_vllm.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = Gemma4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                           num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                           final_logit_softcapping=30.0, layer_types=["full_attention"] * 3,
                           max_position_embeddings=8192)
    d32 = _drafter(AutoModelForCausalLM.from_config(cfg), target_layer_ids=[0, 1])
    with torch.no_grad():
        d32.lm_head.weight.mul_(20.0)  # clear argmax margins: ties would make "equal drafts" a coin flip
    save_checkpoint(d32, tmp_path / "g4")
    d16 = load_checkpoint(tmp_path / "g4", dtype=torch.bfloat16)
    assert d16.fc.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in d16.rotary_emb.buffers())
    feats = _features(1, 3000, 128, seed=1)
    anchors = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2))
    drift, same = _long_context_drift(d32, d16, anchors, feats)
    assert drift < 1.0 and same >= 18
    for name, buf in list(d16.rotary_emb._buffers.items()):
        d16.rotary_emb._buffers[name] = buf.to(torch.bfloat16).float()
    drift, same = _long_context_drift(d32, d16, anchors, feats)
    assert drift > 5.0 and same <= 10


def test_gemma4_double_wide_mlp_layers_load_and_run(tmp_path):
    """Gemma4 configs with use_double_wide_mlp give the last num_kv_shared_layers layers twice
    the intermediate size (Gemma4TextMLP's rule, applied to the draft layers as DeepSpec does):
    such a checkpoint loads with those shapes and drafts."""
    from transformers import AutoModelForCausalLM

    from dspark_vllm.checkpoint import load_checkpoint, save_checkpoint

    cfg = Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                           num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                           layer_types=["full_attention"] * 3, num_kv_shared_layers=1, use_double_wide_mlp=True)
    d = _drafter(AutoModelForCausalLM.from_config(cfg), target_layer_ids=[0, 1])
    assert [layer.mlp.down_proj.weight.shape[1] for layer in d.layers] == [48, 96]
    save_checkpoint(d, tmp_path / "wide")
    loaded = load_checkpoint(tmp_path / "wide")
    assert loaded.layers[1].mlp.down_proj.weight.shape == (32, 96)
    cache = loaded.new_cache(1)
    loaded.add_context(cache, _features(1, 5, 64), torch.tensor([5]))
    torch.testing.assert_close(loaded.forward_block(torch.tensor([3]), cache), d.forward_block(torch.tensor([3]), cache))
    assert loaded.propose(torch.tensor([3]), cache, torch.zeros(1)).tokens.shape == (1, 4)


def test_both_drafters_implement_the_drafter_contract(tiny_qwen3):
    from dspark_vllm.drafter_protocol import DraftModel
    from v4_fixtures import random_v4_drafter, tiny_v4_target

    assert isinstance(_drafter(tiny_qwen3), DraftModel)
    assert isinstance(random_v4_drafter(tiny_v4_target()), DraftModel)
    assert not isinstance(object(), DraftModel)
