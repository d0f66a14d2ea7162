"""Training recipe: packed teacher-forced blocks match inference, the loss follows the spec,
checkpoints resume, and a drafter learns a learnable continuation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_qwen3
from dspark_vllm.checkpoint import build_random_drafter, load_checkpoint, save_checkpoint
from dspark_vllm.training.batch import TrainBatch, anchor_candidates, build_batch, sample_anchor_rows
from dspark_vllm.training.data import FeatureShard, Sample, capture_features
from dspark_vllm.training.loss import LossWeights, dspark_loss
from dspark_vllm.training.trainer import TrainConfig, Trainer, init_for_training, packed_hidden

LAYERS = [0, 2]


def _periodic_samples(n: int, length: int = 40, seed: int = 1) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        period = int(torch.randint(2, 5, (1,), generator=g))
        pattern = torch.randint(0, 120, (period,), generator=g).tolist()
        seq = (pattern * length)[:length]
        out.append(Sample(seq[:6], seq[6:]))
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = make_tiny_qwen3(vocab_size=128, layers=4)
    samples = _periodic_samples(24)
    shard = capture_features(model, samples, LAYERS)
    return model, samples, shard


def test_anchor_candidates_need_two_answer_tokens():
    mask = torch.tensor([False, False, True, True, True, False])
    assert anchor_candidates(mask).tolist() == [2, 3]


def test_packed_blocks_match_inference_forward(setup):
    """Each packed block sees exactly the context before its anchor, as at inference."""
    model, samples, shard = setup
    drafter = build_random_drafter(model, num_layers=2, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    init_for_training(drafter, 0)
    gen = torch.Generator().manual_seed(3)
    batch = build_batch(shard, [0, 5], anchors_per_seq=5, block_size=4, mask_token_id=drafter.config.mask_token_id,
                        generator=gen)
    with torch.no_grad():
        packed = packed_hidden(drafter, batch)
    checked = 0
    for row, seq in enumerate([0, 5]):
        lo = int(shard.offsets[seq])
        for b in range(5):
            anchor_pos = int(batch.block_pos[row, b * 4])
            anchor_tok = int(batch.block_ids[row, b * 4])
            cache = drafter.new_cache(1)
            drafter.add_context(cache, shard.features[lo: lo + anchor_pos][None].float(), torch.tensor([anchor_pos]))
            with torch.no_grad():
                ref = drafter.forward_block(torch.tensor([anchor_tok]), cache)
            torch.testing.assert_close(packed[row * 5 + b], ref[0], rtol=1e-4, atol=1e-4)
            assert anchor_tok == int(shard.tokens[lo + anchor_pos])
            checked += 1
    assert checked == 10


def test_labels_prev_and_validity(setup):
    _, samples, shard = setup
    gen = torch.Generator().manual_seed(0)
    batch = build_batch(shard, [1], anchors_per_seq=40, block_size=4, mask_token_id=127, generator=gen)
    toks = samples[1].tokens
    n_prompt = len(samples[1].prompt_ids)
    for b in range(batch.labels.shape[1]):
        a = int(batch.block_pos[0, b * 4])
        if batch.labels[0, b, 0] < 0:
            continue
        assert a >= n_prompt
        k = int(batch.valid[0, b].sum())
        assert k == min(4, len(toks) - a - 1)
        assert batch.labels[0, b, :k].tolist() == toks[a + 1: a + 1 + k]
        assert batch.prev[0, b, :k].tolist() == toks[a: a + k]


@pytest.mark.parametrize("anchors", [3, 40])
def test_vectorised_batch_equals_per_block_construction(setup, anchors):
    """build_batch (whole-batch gathers) builds exactly what the per-block loop builds, padding
    blocks included (40 anchors > the candidates of these 34-token answers)."""
    _, _, shard = setup
    for seed in range(3):
        fast = build_batch(shard, [0, 7, 3, 7], anchors, 4, 127, torch.Generator().manual_seed(seed))
        slow = _build_batch_loop(shard, [0, 7, 3, 7], anchors, 4, 127, torch.Generator().manual_seed(seed))
        for name in TrainBatch.__dataclass_fields__:
            torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=0, msg=name)



def test_batched_hf_generation_equals_one_prompt_at_a_time():
    """Left-padded batches give each prompt the greedy answer it gets alone; sampled answers
    are reproducible for a seed and differ from greedy."""
    from dspark_vllm.training.data import _generate_hf

    model = make_tiny_qwen3(vocab_size=128, layers=2, logit_scale=4.0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 120, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7)]
    alone = _generate_hf(model, prompts, 10, eos=None, batch_size=1)
    batched = _generate_hf(model, prompts, 10, eos=None, batch_size=3)
    assert batched == alone and all(len(a) == 10 for a in alone)
    hot = _generate_hf(model, prompts, 10, eos=None, batch_size=3, temperature=1.0, seed=1)
    assert hot == _generate_hf(model, prompts, 10, eos=None, batch_size=3, temperature=1.0, seed=1)
    assert hot != alone


def test_length_batches_cover_every_index_within_the_budget():
    from dspark_vllm.training.data import length_batches

    lengths = [5, 40, 3, 12, 12, 7, 100, 9]
    for max_items in (None, 2):
        batches = length_batches(lengths, 30, max_items)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat)
        for b in batches:
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 30
            assert max_items is None or len(b) <= max_items
    assert length_batches(lengths, 30) == [[2, 0, 5], [7, 3], [4], [1], [6]]


def test_answers_are_cut_after_the_first_eos():
    from dspark_vllm.training.data import _strip_after_eos

    assert _strip_after_eos([4, 9, 2, 2, 2], eos=2) == [4, 9, 2]
    assert _strip_after_eos([4, 9, 5], eos=2) == [4, 9, 5]
    assert _strip_after_eos([4, 2], eos=None) == [4, 2]


def test_feature_shard_moves_between_devices(setup):
    _, _, shard = setup
    assert shard.to("cpu") is shard
    moved = shard.to("meta")
    assert moved.features.device.type == "meta" and moved.features.shape == shard.features.shape
    assert moved.offsets.device.type == "cpu"  # read as ints by every batch: no device sync


def test_loss_terms_follow_the_spec():
    torch.manual_seed(0)
    m, v = 6, 11
    draft = torch.randn(m, v)
    target = torch.randn(m, v)
    labels = torch.randint(0, v, (m,))
    pos = torch.tensor([0, 1, 2, 0, 1, 0])
    blocks = torch.tensor([0, 0, 0, 1, 1, 2])
    conf = torch.randn(m)
    out = dspark_loss(draft, target, labels, pos, blocks, 3, 3, conf, LossWeights())
    w = torch.exp(-pos.float() / 4.0)
    pd, pt = draft.softmax(-1), target.softmax(-1)
    l1 = (pd - pt).abs().sum(-1)
    ce = -torch.log_softmax(draft, -1)[torch.arange(m), labels]
    c_star = (1 - l1 / 2).clamp(0, 1)
    bce = -(c_star * torch.nn.functional.logsigmoid(conf) + (1 - c_star) * torch.nn.functional.logsigmoid(-conf))
    expected = (0.1 * (w * ce).sum() + 0.9 * (w * l1).sum() + 1.0 * (w * bce).sum()) / w.sum()
    assert math.isclose(float(out.loss), float(expected), rel_tol=1e-5)
    # block 0 is the only fully supervised block of size 3
    alpha = 1 - l1 / 2
    assert math.isclose(out.metrics["tau_prob"], float(1 + alpha[0] + alpha[0] * alpha[1] + alpha[:3].prod()),
                        rel_tol=1e-5)


def test_training_learns_and_resumes(setup, tmp_path):
    model, samples, shard = setup
    drafter = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    init_for_training(drafter, 0)
    cfg = TrainConfig(steps=40, seqs_per_step=4, anchors_per_seq=8, lr=3e-3, warmup=4, save_every=20, log_every=10)
    first = Trainer(drafter, shard, tmp_path, cfg)
    first.cfg.steps = 20
    first.run()
    # resume in a fresh trainer from the folder; the optimizer step continues at 20
    drafter2 = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    second = Trainer(drafter2, shard, tmp_path, TrainConfig(**{**cfg.__dict__, "steps": 40}))
    assert second.try_resume() and second.step == 20
    torch.testing.assert_close(drafter2.fc.weight, drafter.fc.weight)
    second.run()
    assert second.step == 40
    import json

    log = [json.loads(x) for x in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    # the saved checkpoint omits the shared embeddings and binds them from the target on load
    loaded = load_checkpoint(tmp_path, target=model)
    assert loaded.embeddings_bound
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    unbound = load_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="shares the target's embeddings"):
        unbound.propose(torch.tensor([1]), unbound.new_cache(1), torch.zeros(1))


def test_full_checkpoint_still_round_trips(setup, tmp_path):
    model, _, _ = setup
    drafter = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    save_checkpoint(drafter, tmp_path)
    again = load_checkpoint(tmp_path)
    for (k, a), (_, b) in zip(drafter.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_vocabulary_subset_logits_are_the_full_logits_columns(setup, head_type):
    """loss_vocab='active' computes exactly the chosen columns of the full draft/target logits."""
    from dspark_vllm.training.trainer import target_logits, teacher_forced_outputs

    model, _, shard = setup
    drafter = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8,
                                   markov_head_type=head_type)
    batch = build_batch(shard, [2, 3], anchors_per_seq=6, block_size=4, mask_token_id=drafter.config.mask_token_id,
                        generator=torch.Generator().manual_seed(0))
    vocab = torch.tensor([0, 5, 17, 64, 100, 127])
    with torch.no_grad():
        full, conf_full, bi, pos, _ = teacher_forced_outputs(drafter, batch)
        sub, conf_sub, bi2, pos2, _ = teacher_forced_outputs(drafter, batch, vocab)
        torch.testing.assert_close(sub, full[:, vocab], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conf_sub, conf_full)
        torch.testing.assert_close(target_logits(drafter, batch, bi, pos, vocab),
                                   target_logits(drafter, batch, bi, pos)[:, vocab], rtol=1e-5, atol=1e-5)


def test_active_vocabulary_training_step_covers_every_label(setup, tmp_path):
    model, _, shard = setup
    drafter = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    trainer = Trainer(drafter, shard, tmp_path, TrainConfig(loss_vocab="active", negatives=16, seqs_per_step=2,
                                                            anchors_per_seq=4))
    answers = set(shard.tokens[shard.loss_mask].tolist())
    assert set(trainer.active.tolist()) == answers
    vocab = trainer.step_vocabulary()
    assert answers <= set(vocab.tolist()) and len(vocab) <= len(answers) + 16
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["tokens"] > 0


def test_saved_fc_takes_raw_features(setup, tmp_path):
    """Training runs fc on features / scale; the checkpoint's fc must give the same fused context
    on raw features (the scale is folded into the weight)."""
    model, _, shard = setup
    drafter = build_random_drafter(model, num_layers=1, block_size=4, target_layer_ids=LAYERS, markov_rank=8)
    init_for_training(drafter, 0)
    trainer = Trainer(drafter, shard, tmp_path, TrainConfig(seqs_per_step=2, anchors_per_seq=4))
    assert trainer.feature_scale.shape == (shard.features.shape[1],)
    trainer.train_step()
    trainer.save()
    raw = shard.features[:10].float()
    loaded = load_checkpoint(tmp_path, target=model, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.fuse_context(raw), drafter.fuse_context(raw / trainer.feature_scale),
                                   rtol=1e-4, atol=1e-4)


def test_draft_vocabulary_ranks_by_frequency_and_loads_with_the_checkpoint(tmp_path, tiny_qwen3):
    import json

    from dspark_vllm.training.draft_vocab import coverage, rank_tokens, write_draft_vocab

    ranked = rank_tokens([[5, 5, 7, 9], [7, 5, 200]], vocab_size=12)
    assert ranked[:3] == [5, 7, 9] and sorted(ranked) == list(range(12))  # unseen ids by ascending id
    assert coverage([5, 7], [[5, 7, 9, 9]]) == 0.5

    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8, target_layer_ids=[0, 1])
    save_checkpoint(drafter, tmp_path)
    samples = [{"prompt_ids": [1, 2], "answer_ids": [3, 3, 4 + i % 3]} for i in range(10)]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"samples": samples}))
    info = write_draft_vocab(tmp_path, answers, size=16, vocab_size=128)
    assert info["token_ids"][0] == 3 and len(info["token_ids"]) == 16
    assert info["held_out_answer_coverage"] == 1.0
    assert load_checkpoint(tmp_path).draft_vocab.tolist() == info["token_ids"]
    assert load_checkpoint(tmp_path, draft_vocab_size=5).draft_vocab.tolist() == info["token_ids"][:5]
    assert load_checkpoint(tmp_path, draft_vocab_size=0).draft_vocab is None
    with pytest.raises(ValueError, match="ranks only 16 ids"):
        load_checkpoint(tmp_path, draft_vocab_size=17)
    (tmp_path / "draft_vocab.json").unlink()
    assert load_checkpoint(tmp_path).draft_vocab is None
    with pytest.raises(FileNotFoundError, match="dspark-vllm draft-vocab"):
        load_checkpoint(tmp_path, draft_vocab_size=8)


def _build_batch_loop(shard: FeatureShard, seq_ids: list[int], anchors_per_seq: int, block_size: int,
                      mask_token_id: int, generator: torch.Generator) -> TrainBatch:
    """The straightforward per-block construction, kept as the oracle for build_batch."""
    rows = sample_anchor_rows(shard, seq_ids, anchors_per_seq, generator)
    s_n, a_n, b_n = len(rows), anchors_per_seq, block_size
    t_n = max(int(anchors.max()) for _, _, anchors in rows)
    t_n = max(t_n, 1)
    m_h, h = shard.features.shape[1], shard.last_hidden.shape[1]
    context = torch.zeros(s_n, t_n, m_h, dtype=shard.features.dtype)
    block_ids = torch.full((s_n, a_n * b_n), mask_token_id, dtype=torch.long)
    block_pos = torch.zeros(s_n, a_n * b_n, dtype=torch.long)
    mask = torch.zeros(s_n, a_n * b_n, t_n + a_n * b_n, dtype=torch.bool)
    labels = torch.full((s_n, a_n, b_n), -1, dtype=torch.long)
    prev = torch.zeros(s_n, a_n, b_n, dtype=torch.long)
    target_hidden = torch.zeros(s_n, a_n, b_n, h, dtype=shard.last_hidden.dtype)
    j = torch.arange(b_n)
    for r, (lo, hi, anchors) in enumerate(rows):
        n = hi - lo
        toks = shard.tokens[lo:hi]
        lm = shard.loss_mask[lo:hi]
        ctx_len = min(int(anchors.max()), t_n)
        context[r, :ctx_len] = shard.features[lo: lo + ctx_len]
        for b in range(a_n):
            q = slice(b * b_n, (b + 1) * b_n)
            mask[r, q, t_n + b * b_n: t_n + (b + 1) * b_n] = True  # own block, non-causal
            if b >= len(anchors):
                continue  # padding block: sees only itself, never supervised
            a = int(anchors[b])
            block_ids[r, b * b_n] = toks[a]
            block_pos[r, q] = a + j
            mask[r, q, :a] = True
            lab_pos = a + 1 + j
            inside = lab_pos < n
            ok = inside.clone()
            ok[inside] &= lm[lab_pos[inside]]
            ok = torch.cumprod(ok.long(), 0).bool()
            k = int(ok.sum())
            labels[r, b, :k] = toks[a + 1: a + 1 + k]
            prev[r, b, 0] = toks[a]
            prev[r, b, 1:k] = toks[a + 1: a + k]
            target_hidden[r, b, :k] = shard.last_hidden[lo + a: lo + a + k]
    context_pos = torch.arange(t_n)[None, :].expand(s_n, t_n).contiguous()
    return TrainBatch(context, context_pos, block_ids, block_pos, mask, labels, prev, target_hidden)
