"""The encoder's dense [S, L] groups: every sequence lands in exactly one row of a shape
compiled at warm-up, padding stays bounded, token types mark the second text of a pair."""

import numpy as np

from xlaserve.pooling.encoder_batch import EncoderBuckets, row_buckets, split_rows


def test_row_buckets_and_splits():
    assert row_buckets(15) == (1, 4, 15)
    assert row_buckets(64) == (1, 4, 16, 64)
    assert [(len(p), r) for p, r in split_rows(list(range(8)), (1, 4, 15))] == [(4, 4), (4, 4)]
    assert [(len(p), r) for p, r in split_rows(list(range(12)), (1, 4, 15))] == [(12, 15)]
    assert [(len(p), r) for p, r in split_rows(list(range(17)), (1, 4, 16))] == [(16, 16), (1, 1)]


def test_groups_cover_every_sequence_once_in_warmed_up_shapes():
    buckets = EncoderBuckets(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=256)
    assert buckets.lengths == (16, 32, 64, 128, 256)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, 40).tolist()
    ids = [list(range(1, n + 1)) for n in lengths]
    groups = buckets.groups(ids, [None] * 40, [0] * 40)
    shapes = set(buckets.shapes())
    seen = []
    for g in groups:
        rows, length = g.input_ids.shape
        assert (rows, length) in shapes
        for r, i in enumerate(g.indices):
            n = lengths[i]
            assert length // 2 < n <= length or length == 16
            assert g.lengths[r] == n and g.input_ids[r, :n].tolist() == ids[i]
            assert not g.input_ids[r, n:].any()
        assert not g.lengths[len(g.indices) :].any()  # padding rows are empty
        seen += g.indices
    assert sorted(seen) == list(range(40))


def test_pair_token_types():
    buckets = EncoderBuckets(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    (group,) = buckets.groups([[101, 5, 102, 7, 8, 102]], [3], [1])
    assert group.token_type_ids[0, :8].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert group.methods[0] == 1
