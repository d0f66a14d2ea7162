"""The oracle drafts both engines use: known continuations, optionally corrupted at one position."""

from dspark_vllm.oracle import OracleDrafts


def test_blocks_follow_the_history_and_pad_past_the_end(tmp_path):
    oracle = OracleDrafts([[1, 2, 3, 4, 5], [1, 9, 8]], block_size=3, vocab_size=10)
    assert oracle.after([1, 2]) == [3, 4, 5]
    assert oracle.after([1, 9]) == [8, 0, 0]
    assert oracle.after([7]) is None
    path = tmp_path / "o.json"
    path.write_text('{"sequences": [[1, 2, 3, 4, 5]]}')
    corrupted = OracleDrafts.from_json(path, block_size=3, vocab_size=10, corrupt=1)
    assert corrupted.after([1, 2]) == [3, 5, 5]  # draft 1 changed: acceptance must stop there
    assert corrupted.block([9, 9], 0) == [9, 0, 0]  # (9 + 1) % 10 at position 1
