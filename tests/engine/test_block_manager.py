"""BlockManager tests worked out by hand (pages of 2 tokens unless said otherwise)."""

import pytest

from xlaserve.engine.block_manager import BlockManager
from xlaserve.engine.request import Sequence
from xlaserve.engine.sampling_params import SamplingParams

_ids = iter(range(10**6))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(
        seq_id=next(_ids),
        request_id="r",
        prompt_token_ids=tokens,
        params=SamplingParams(),
        max_model_len=1000,
    )


def compute(bm: BlockManager, s: Sequence, num_new: int | None = None) -> None:
    """Admits `s` and marks everything it was given as computed (what a step does)."""
    num_new = s.num_tokens - bm.get_computed_prefix(s)[1] if num_new is None else num_new
    assert bm.can_allocate(s, num_new)
    bm.allocate(s, num_new)
    s.num_computed_tokens += num_new
    bm.cache_full_pages(s)


def test_allocate_append_free_counts_pages():
    bm = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=False)
    s = seq([1, 2, 3])
    bm.allocate(s, 3)
    assert bm.page_ids(s) == [0, 1] and bm.ref_counts == [1, 1, 0, 0]
    assert (bm.num_free_pages, bm.usage) == (2, 0.5)
    s.num_computed_tokens = 3
    s.append_token(9)
    assert bm.can_append(s, 1)
    bm.append_slots(s, 1)  # position 3 still fits page 1
    assert bm.page_ids(s) == [0, 1]
    assert bm.can_append(s, 5) and not bm.can_append(s, 6)  # 3 + 5 = 8 tokens = 4 pages
    bm.append_slots(s, 3)
    assert bm.page_ids(s) == [0, 1, 2]
    bm.free(s)
    assert bm.page_ids(s) == [] and bm.ref_counts == [0] * 4 and bm.num_free_pages == 4


def test_freed_pages_are_reused_least_recently_freed_first():
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=True)
    a, b = seq([1, 2, 3, 4]), seq([5, 6, 7, 8])
    compute(bm, a)  # pages 0, 1
    compute(bm, b)  # pages 2, 3
    bm.free(b)
    bm.free(a)  # a's tail page is queued before its head page
    assert bm.free_queue() == [4, 5, 3, 2, 1, 0]
    c = seq([9] * 8)
    compute(bm, c, 6)  # 3 pages: never-used 4 and 5, then b's page 3 (freed first)
    assert bm.page_ids(c) == [4, 5, 3]
    # b's first page is still cached: a new sequence finds it, its second page is gone.
    d = seq([5, 6, 7, 8, 1])
    assert bm.get_computed_prefix(d) == ([2], 2)
    # a was freed last: both its pages are still cached.
    e = seq([1, 2, 3, 4, 1])
    assert bm.get_computed_prefix(e) == ([0, 1], 4)


def test_cached_prefix_never_covers_the_last_token():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4])
    compute(bm, a)
    pages = bm.page_ids(a)
    assert bm.is_cached(pages[0]) and bm.is_cached(pages[1])
    assert bm.get_computed_prefix(seq([1, 2, 3, 4])) == ([pages[0]], 2)
    assert bm.get_computed_prefix(seq([1, 2, 3, 4, 5])) == (pages[:2], 4)
    assert bm.get_computed_prefix(seq([1, 2])) == ([], 0)


def test_lookup_matches_exact_tokens_and_the_whole_chain():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True)
    compute(bm, seq([1, 2, 3, 4, 0]))
    assert bm.get_computed_prefix(seq([1, 9, 3, 4, 0])) == ([], 0)
    # Same second page after a different first page: not a hit (the chain differs).
    compute(bm, seq([7, 7, 3, 4, 0]))
    s = seq([1, 2, 3, 4, 0])
    pages, num_tokens = bm.get_computed_prefix(s)
    assert num_tokens == 4 and len(set(pages)) == 2
    other = seq([7, 7, 3, 4, 0])
    assert bm.get_computed_prefix(other)[0][1] != pages[1]


def test_only_computed_pages_are_cached():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6])
    bm.allocate(a, 6)
    a.num_computed_tokens = 3  # a chunk of 3: page 0 full, page 1 half
    bm.cache_full_pages(a)
    pages = bm.page_ids(a)
    assert [bm.is_cached(p) for p in pages] == [True, False, False]
    assert bm.get_computed_prefix(seq([1, 2, 3, 4, 5, 6])) == ([pages[0]], 2)


def test_shared_pages_are_refcounted():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True)
    a, b = seq([1, 2, 3]), seq([1, 2, 4])
    compute(bm, a)
    compute(bm, b)
    shared = bm.page_ids(a)[0]
    assert bm.page_ids(b)[0] == shared and b.num_cached_prompt_tokens == 2
    assert bm.ref_counts[shared] == 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (6, 2)
    bm.free(a)
    assert bm.ref_counts[shared] == 1 and bm.num_free_pages == 6
    bm.free(b)
    assert bm.num_free_pages == 8 and not any(bm.ref_counts)


def test_can_allocate_counts_revived_cached_pages():
    bm = BlockManager(num_pages=4, page_size=2, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4])
    compute(bm, a)
    bm.free(a)  # 2 free cached pages
    bm.allocate(seq([9]), 1)  # someone holds 1 page: 3 free, 2 of them are a's
    b = seq([1, 2, 3, 4] + [0] * 5)
    assert bm.get_computed_prefix(b)[1] == 4
    assert bm.can_allocate(b, 2)  # 2 revived + 1 new = 3
    assert not bm.can_allocate(b, 4)  # 2 revived + 2 new = 4 > 3 free


def test_shared_prefix_for_siblings_without_caching():
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_caching=False)
    first, sibling = seq([1, 2, 3, 4, 5]), seq([1, 2, 3, 4, 5])
    compute(bm, first)
    first_pages = bm.page_ids(first)
    assert not any(bm.is_cached(p) for p in first_pages)
    assert bm.get_computed_prefix(sibling) == ([], 0)
    prefix = bm.shared_prefix(sibling, first)
    assert prefix == (first_pages[:2], 4)
    bm.allocate(sibling, 1, prefix)
    assert bm.page_ids(sibling)[:2] == first_pages[:2] and sibling.num_computed_tokens == 4
    assert [bm.ref_counts[p] for p in first_pages] == [2, 2, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)


def test_page_tables_are_per_sequence_and_go_with_free():
    # The manager owns the tables: a freed (preempted) sequence holds nothing, and when it is
    # admitted again it takes its own cached pages back and gets a fresh table.
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=True)
    a, b = seq([1, 2, 3, 4, 5]), seq([6, 7, 8])
    compute(bm, a)
    compute(bm, b)
    assert (bm.page_ids(a), bm.page_ids(b)) == ([0, 1, 2], [3, 4])
    bm.free(a)
    assert bm.page_ids(a) == [] and bm.page_ids(b) == [3, 4]
    a.num_computed_tokens = 0
    a.append_token(9)  # it had sampled a token before it was preempted: 6 tokens now
    assert bm.get_computed_prefix(a) == ([0, 1], 4)
    bm.allocate(a, 2)
    assert bm.page_ids(a) == [0, 1, 5] and a.num_computed_tokens == 4
    assert bm.ref_counts == [1, 1, 0, 1, 1, 1] and bm.free_queue() == [2]


@pytest.mark.parametrize("kwargs", [{"num_pages": 0}, {"page_size": True}, {"page_size": 1.5}])
def test_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BlockManager(**{"num_pages": 4, "page_size": 2, "enable_prefix_caching": True, **kwargs})
