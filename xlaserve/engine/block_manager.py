"""The KV page pool: reference counts, a prefix cache of full pages, LRU eviction.

A sequence's K/V live in `page_size`-token pages listed in its page table, which this class
owns (`page_ids(seq)`): token at position p sits in page `page_ids[p // page_size]`, slot
`p % page_size`.

Prefix caching: once all tokens of a page are computed, the page is registered under the key
`(parent_digest, tokens_of_the_page)`, where `parent_digest` is a SHA-256 chain over all earlier
pages of the sequence, started from the identity of its LoRA adapter (a hash of the adapter's
weights, so a renamed or reloaded adapter never reads another's KV). The dict compares the token
tuple exactly, so a lookup only returns a page that holds exactly those tokens after an identical
digest chain. Freed pages keep their key and sit in an LRU free queue (freed longest ago = reused
first); a page loses its key only when it is handed out as a new page. A later request with the
same prefix takes such a page back (refcount 0 -> 1) without recomputing it. A page with refcount >
1 is always a full, computed, read-only page: nobody ever writes into a shared page.

Sliding windows: when every layer of the model attends only to the last `window` positions,
a page whose tokens all lie before the window of the sequence's next query can never be read
again (`release_outside_window`). Its reference is dropped at once (it may serve other
sequences, keeps its cache key and can be evicted) while it stays listed in the page table, so
positions keep mapping to pages; the attention masks every key outside the window, whatever the
page holds by then.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from xlaserve.engine.request import Sequence
from xlaserve.multimodal.inputs import page_extra_key

# (digest of all earlier pages, token ids of this page)
CacheKey = tuple[bytes, tuple[int, ...]]
Prefix = tuple[list[int], int]  # (page ids, number of tokens they hold)
_NO_PAGES: list[int] = []  # what page_ids() returns for a sequence holding none (never mutated)


class BlockManager:
    """Hands out KV pages to sequences. Pages are ints in [0, num_pages)."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool) -> None:
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.ref_counts = [0] * num_pages  # read-only outside this class
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._page_key: list[CacheKey | None] = [None] * num_pages
        self._cache: dict[CacheKey, int] = {}
        self._num_hashed: dict[int, int] = {}  # seq_id -> leading pages already registered
        self._tables: dict[int, list[int]] = {}  # seq_id -> page table
        self._released: dict[int, int] = {}  # seq_id -> leading pages already released
        # seq_id -> chained digests of the sequence's full token pages (a memo: tokens are
        # append-only, so they never go stale while the sequence holds or seeks pages).
        self._hashes: dict[int, list[bytes]] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # tokens found computed in the cache

    # ---------------------------------------------------------------- queries

    @property
    def num_free_pages(self) -> int:
        """Pages with refcount 0 (cached-but-free pages included: they can be evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages held by sequences, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def page_ids(self, seq: Sequence) -> list[int]:
        """The sequence's page table (the live list: read it, never mutate it)."""
        return self._tables.get(seq.seq_id, _NO_PAGES)

    def is_cached(self, page_id: int) -> bool:
        return self._page_key[page_id] is not None

    def free_queue(self) -> list[int]:
        """Free pages in eviction order (next to be handed out first)."""
        return list(self._free)

    def get_computed_prefix(self, seq: Sequence) -> Prefix:
        """The longest run of leading full pages of `seq` found in the prefix cache.

        Never covers the last token: at least one token must be fed so its logits exist, so the
        match is capped at (num_tokens - 1) rounded down to a page.
        """
        if not self.enable_prefix_caching:
            return [], 0
        tokens = seq.all_token_ids
        size = self.page_size
        pages: list[int] = []
        for i in range((seq.num_tokens - 1) // size):
            page = self._cache.get(self._key(seq, i, tokens))
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * size

    def shared_prefix(self, seq: Sequence, source: Sequence) -> Prefix:
        """Full computed prompt pages of `source` (a sibling of `seq`) that `seq` can share.

        The request-local path used when prefix caching is off: siblings share the prompt pages
        by refcount without any hashing. Capped like `get_computed_prefix`.
        """
        assert seq.prompt_token_ids == source.prompt_token_ids
        num_tokens = min(seq.num_prompt_tokens, source.num_computed_tokens, seq.num_tokens - 1)
        source_pages = self.page_ids(source)
        num_pages = min(num_tokens // self.page_size, len(source_pages))
        return list(source_pages[:num_pages]), num_pages * self.page_size

    # ---------------------------------------------------------------- verbs

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, prefix: Prefix | None = None
    ) -> bool:
        """Whether `seq` (holding no pages) can take `prefix` (default: the cache lookup) plus
        pages for `num_new_tokens` more tokens."""
        pages, num_cached = self.get_computed_prefix(seq) if prefix is None else prefix
        num_new_pages = self.pages_for(num_cached + num_new_tokens) - len(pages)
        num_revived = sum(1 for p in pages if self.ref_counts[p] == 0)  # taken off the free queue
        return num_new_pages + num_revived <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: Prefix | None = None) -> None:
        """Gives `seq` the prefix pages (refcount + 1) and new pages for `num_new_tokens` more.

        Sets `seq.num_computed_tokens` (and `num_cached_prompt_tokens`) to the prefix length.
        """
        assert seq.seq_id not in self._tables, f"sequence {seq.seq_id} already holds pages"
        pages, num_cached = self.get_computed_prefix(seq) if prefix is None else prefix
        assert num_cached % self.page_size == 0 and len(pages) * self.page_size == num_cached
        assert 0 < num_new_tokens and num_cached + num_new_tokens <= seq.num_tokens
        for page in pages:  # take the hits first so the new pages below cannot evict them
            if self.ref_counts[page] == 0:
                del self._free[page]
            self.ref_counts[page] += 1
        num_new_pages = self.pages_for(num_cached + num_new_tokens) - len(pages)
        self._tables[seq.seq_id] = list(pages) + [
            self._take_free_page() for _ in range(num_new_pages)
        ]
        seq.num_computed_tokens = num_cached
        seq.num_cached_prompt_tokens = num_cached
        self._num_hashed[seq.seq_id] = len(pages) if self.enable_prefix_caching else 0
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `seq` can grow to hold `num_new_tokens` tokens past its computed ones."""
        need = self.pages_for(seq.num_computed_tokens + num_new_tokens) - len(self.page_ids(seq))
        return need <= len(self._free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows `seq`'s page table to hold `num_new_tokens` tokens past its computed ones."""
        table = self._tables[seq.seq_id]
        need = self.pages_for(seq.num_computed_tokens + num_new_tokens) - len(table)
        table.extend(self._take_free_page() for _ in range(need))

    def cache_full_pages(self, seq: Sequence) -> None:
        """Registers `seq`'s newly full, computed pages in the prefix cache.

        Call after `seq.num_computed_tokens` advanced. If an identical page is already cached
        (two identical prefixes computed at once) the existing entry wins and this page stays
        private to `seq`.
        """
        if not self.enable_prefix_caching:
            return
        size = self.page_size
        tokens = seq.all_token_ids
        table = self.page_ids(seq)
        # Pending tokens (async scheduling) have no id yet: their pages wait to be hashed.
        known = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending)
        num_full = min(known // size, len(table))
        start = self._num_hashed.get(seq.seq_id, 0)
        for i in range(start, num_full):
            page = table[i]
            if self._page_key[page] is not None:  # a prefix hit: already registered
                continue
            key = self._key(seq, i, tokens)
            if key not in self._cache:
                self._cache[key] = page
                self._page_key[page] = key
        self._num_hashed[seq.seq_id] = max(start, num_full)

    def release_outside_window(self, seq: Sequence, window: int) -> int:
        """Releases `seq`'s leading pages that lie wholly before the window of its next query
        (position num_computed_tokens sees keys > num_computed_tokens - window); returns how
        many were released now. Call after num_computed_tokens advanced."""
        table = self._tables.get(seq.seq_id)
        if table is None:
            return 0
        first_visible = seq.num_computed_tokens - window + 1
        dead = min(max(first_visible, 0) // self.page_size, len(table))
        start = self._released.get(seq.seq_id, 0)
        for page in table[start:dead]:
            self._unref(page)
        self._released[seq.seq_id] = max(start, dead)
        return max(dead - start, 0)

    def free(self, seq: Sequence) -> None:
        """Releases `seq`'s pages (refcount - 1). Pages reaching 0 join the free queue with
        their cache key kept. Tail pages are queued first: they are evicted first, which keeps
        the longer-lived shared prefixes (page chains are only useful from their start)."""
        table = self._tables.pop(seq.seq_id, _NO_PAGES)
        released = self._released.pop(seq.seq_id, 0)  # already released outside a window
        for page in reversed(table[released:]):
            self._unref(page)
        self._num_hashed.pop(seq.seq_id, None)
        self._hashes.pop(seq.seq_id, None)

    # ---------------------------------------------------------------- internals

    def _unref(self, page: int) -> None:
        self.ref_counts[page] -= 1
        assert self.ref_counts[page] >= 0, f"page {page} freed twice"
        if self.ref_counts[page] == 0:
            self._free[page] = None

    def _take_free_page(self) -> int:
        """Pops the least recently freed page, evicting its cache entry if it has one."""
        page, _ = self._free.popitem(last=False)
        key = self._page_key[page]
        if key is not None:
            if self._cache.get(key) == page:
                del self._cache[key]
            self._page_key[page] = None
        assert self.ref_counts[page] == 0
        self.ref_counts[page] = 1
        return page

    def _key(self, seq: Sequence, i: int, tokens: list[int]) -> CacheKey:
        """Page i's cache key. A page holding image placeholders also carries the images'
        content keys (placeholder tokens are the same for every image)."""
        size = self.page_size
        page_tokens = tuple(tokens[i * size : (i + 1) * size])
        if seq.mm_items:
            page_tokens += (page_extra_key(seq.mm_items, i * size, (i + 1) * size),)
        return self._digest(seq, i - 1), page_tokens

    def _digest(self, seq: Sequence, page_index: int) -> bytes:
        """Chained digest of `seq`'s pages 0..page_index. The chain starts (page_index -1)
        from the identity of the sequence's LoRA adapter (b"" for the base model), so pages
        are shared only between sequences run under the same weights."""
        root = b"" if seq.lora is None else seq.lora.key
        if page_index < 0:
            return root
        hashes = self._hashes.setdefault(seq.seq_id, [])
        size = self.page_size
        tokens = seq.all_token_ids
        while len(hashes) <= page_index:
            i = len(hashes)
            parent = hashes[-1] if hashes else root
            page_tokens = array("q", tokens[i * size : (i + 1) * size]).tobytes()
            if seq.mm_items:  # image placeholders look alike: the images' content keys differ
                page_tokens += page_extra_key(seq.mm_items, i * size, (i + 1) * size)
            hashes.append(hashlib.sha256(parent + page_tokens).digest())
        return hashes[page_index]
