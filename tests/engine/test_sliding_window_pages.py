"""Pages wholly before every layer's sliding window are released as a sequence advances
(worked out by hand: pages of 4 tokens, a window of 6)."""

import numpy as np

from tests.conftest import TEST_TOKEN_BUCKETS
from tests.engine.test_block_manager import compute, seq
from tests.models.tiny_configs import save_tiny_model
from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints.loader import load_model
from xlaserve.engine.block_manager import BlockManager
from xlaserve.engine.builder import windowed_kv
from xlaserve.models.generate import greedy_generate
from xlaserve.models.registry import preset_config


def test_pages_before_the_window_are_released_once_and_freed_once():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    s = seq(list(range(10)))
    compute(bm, s)  # positions 0..9 in pages [0, 1, 2]
    # The next query (position 10) sees keys > 4: page 0 (0..3) is dead, page 1 (4..7) not.
    assert bm.release_outside_window(s, window=6) == 1
    assert bm.page_ids(s) == [0, 1, 2]  # still listed: positions keep mapping to pages
    assert bm.ref_counts[:3] == [0, 1, 1] and bm.num_free_pages == 6
    assert bm.release_outside_window(s, window=6) == 0  # nothing new
    for _ in range(4):  # positions 10..13: the next query (14) sees keys > 8
        s.append_token(1)
        bm.append_slots(s, 1)
        s.num_computed_tokens += 1
    assert bm.page_ids(s) == [0, 1, 2, 3]
    assert bm.release_outside_window(s, window=6) == 1  # page 1 (4..7)
    assert bm.ref_counts[:4] == [0, 0, 1, 1]
    bm.free(s)  # only the pages not yet released
    assert bm.ref_counts == [0] * 8 and bm.num_free_pages == 8


def test_window_longer_than_the_sequence_releases_nothing():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=True)
    s = seq(list(range(10)))
    compute(bm, s)
    assert bm.release_outside_window(s, window=11) == 0
    assert bm.release_outside_window(s, window=7) == 1  # keys > 3 visible from position 10


def test_only_models_windowed_in_every_layer_release_pages():
    assert windowed_kv(preset_config("gemma-3-1b")[1]) is None  # global layers see everything
    assert windowed_kv(preset_config("llama-3-8b")[1]) is None


def test_mistral_engine_with_released_pages_equals_the_model_loop(tmp_path):
    save_tiny_model("mistral", tmp_path)  # sliding_window=12 in every layer
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 160, n).tolist() for n in (40, 25, 33)]
    loaded = load_model(str(tmp_path), dtype="float32", with_tokenizer=False)
    assert windowed_kv(loaded.config) == 12
    expected = greedy_generate(loaded.model, prompts, 24, stop_token_ids=())
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, page_size=8,
              token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip
    scheduler = llm.engine.scheduler
    assert scheduler.config.kv_window == 12
    released = []
    manager = scheduler.block_manager
    original = manager.release_outside_window
    manager.release_outside_window = lambda s, w: released.append(original(s, w)) or released[-1]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    # 40 + 24 tokens with a window of 12 need 2-3 live pages of 8, not 8: most were released.
    assert sum(released) >= 3 * 4
    assert manager.num_free_pages == manager.num_pages
