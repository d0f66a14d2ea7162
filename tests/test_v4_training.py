"""Training the DeepSeek-V4 drafter with the project's own trainer against a tiny V4 target:
packed blocks equal the inference forward (sliding window included), and a self-distilled
drafter reaches real acceptance in the reference decoder."""

import torch
from v4_fixtures import BLOCK, TARGET_LAYERS, VOCAB, tiny_v4_target

from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
from dspark_vllm.reference_proposers import DSparkProposer
from dspark_vllm.training.batch import build_batch
from dspark_vllm.training.data import Sample, capture_features
from dspark_vllm.training.trainer import TrainConfig, Trainer, init_for_training, packed_hidden
from dspark_vllm.v4 import DSparkV4Drafter, V4DraftConfig
from dspark_vllm.v4.loader import load_v4_drafter, save_v4_drafter
from dspark_vllm.v4.target import V4Target


def new_drafter(model, seed=0) -> DSparkV4Drafter:
    drafter = DSparkV4Drafter(V4DraftConfig(model.config.to_dict()))
    drafter.bind_target_embeddings(model.model.embed_tokens.weight, model.lm_head.weight)
    init_for_training(drafter, seed)
    return drafter


def self_distilled_samples(model, prompts, answer_len):
    outs, _ = ReferenceDecoder(V4Target(model, TARGET_LAYERS), None).generate(
        prompts, SamplingConfig(max_new_tokens=answer_len))
    return [Sample(p, o) for p, o in zip(prompts, outs)]


def random_prompts(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB - 1, (length,), generator=g).tolist() for _ in range(n)]


def test_packed_v4_blocks_equal_the_inference_forward_with_the_sliding_window():
    model = tiny_v4_target(scale=0.3)
    samples = self_distilled_samples(model, random_prompts(2, 30, seed=5), 24)  # contexts past the 16-token window
    shard = capture_features(model, samples, TARGET_LAYERS)
    drafter = new_drafter(model)
    batch = build_batch(shard, [0, 1], anchors_per_seq=4, block_size=BLOCK, mask_token_id=drafter.config.mask_token_id,
                        generator=torch.Generator().manual_seed(1), context_window=drafter.context_window)
    with torch.no_grad():
        packed = packed_hidden(drafter, batch)
    for row in range(2):
        lo = int(shard.offsets[row])
        for b in range(4):
            pos, tok = int(batch.block_pos[row, b * BLOCK]), int(batch.block_ids[row, b * BLOCK])
            assert pos > drafter.context_window  # the window cuts this block's context
            cache = drafter.new_cache(1)
            drafter.add_context(cache, shard.features[lo: lo + pos][None].float(), torch.tensor([pos]))
            with torch.no_grad():
                ref = drafter.forward_block(torch.tensor([tok]), cache)
            torch.testing.assert_close(packed[row * 4 + b], ref[0], rtol=1e-4, atol=1e-4)


def test_a_self_distilled_v4_drafter_is_accepted(tmp_path):
    """A few hundred steps of the trainer on the target's own greedy answers; the trained stages
    go into the target folder as mtp.* and are loaded back from there, as served."""
    model = tiny_v4_target(scale=0.3)
    prompts = random_prompts(128, 8, seed=7)
    samples = self_distilled_samples(model, prompts, 40)
    shard = capture_features(model, samples, TARGET_LAYERS)
    cfg = TrainConfig(steps=300, seqs_per_step=8, anchors_per_seq=8, lr=3e-3, warmup=20, save_every=300,
                      log_every=50, threads=2)
    trainer = Trainer(new_drafter(model), shard, tmp_path / "run", cfg)
    trainer.run()
    target_dir = tmp_path / "target"
    model.save_pretrained(target_dir)
    trained = load_v4_drafter(tmp_path / "run", bind_embeddings=False)
    save_v4_drafter(trained, target_dir)
    drafter = load_v4_drafter(target_dir)  # served form: stages from mtp.*, embedding from the target
    held_out = random_prompts(8, 8, seed=99)
    reference, _ = ReferenceDecoder(V4Target(model, TARGET_LAYERS), None).generate(
        held_out, SamplingConfig(max_new_tokens=32))
    out, stats = ReferenceDecoder(V4Target(model, TARGET_LAYERS), DSparkProposer(drafter)).generate(
        held_out, SamplingConfig(max_new_tokens=32))
    assert out == reference
    assert stats.tau > 1.5, stats.summary()
    untrained = new_drafter(model)  # the same drafter before training: acceptance is training's doing
    _, before = ReferenceDecoder(V4Target(model, TARGET_LAYERS), DSparkProposer(untrained)).generate(
        held_out, SamplingConfig(max_new_tokens=32))
    assert before.tau < stats.tau - 0.3, (before.summary(), stats.summary())
