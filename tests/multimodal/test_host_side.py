"""The device-free parts worked out by hand: placements of image features in a step (chunks
starting and ending inside an image), the scheduler's encoder budget, the prefix cache keyed by
image content, and the media policy's URL rules."""

import base64
import http.server
import threading

import numpy as np
import pytest

from tests.engine.mock_runner import MockRunner
from xlaserve.engine.input_batch import Chunk
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.errors import InvalidRequestError
from xlaserve.multimodal.inputs import ImageItem
from xlaserve.multimodal.media import MediaPolicy, fetch_image_bytes
from xlaserve.multimodal.placement import cut_before_image, image_placements

NO_PIXELS = np.zeros((1, 3, 2, 2), np.float32)


def item(key: bytes, positions) -> ImageItem:
    return ImageItem(key, np.asarray(positions, np.int32), NO_PIXELS, 1)


# Prompt: tokens 0..19; image A's placeholders at 3..6 (4 features), B's at 9, 10, 12, 13 (a
# row tag at 11 sits between its tiles).
A, B = item(b"a", [3, 4, 5, 6]), item(b"b", [9, 10, 12, 13])


def test_placements_of_chunks_cutting_through_images():
    # Sequence 0 runs 5..11 (A's last two features, B's first two); sequence 1 (A alone at
    # its own positions) runs 0..3 behind it in the step.
    chunks = [Chunk(0, list(range(5, 12)), 5, [], False), Chunk(1, [0, 1, 2, 3], 0, [], False)]
    other = item(b"a", [2, 3])
    placed = image_placements(chunks, {0: [A, B], 1: [other]}.get)
    got = [(p.item.key, p.step_rows.tolist(), p.feature_rows.tolist()) for p in placed]
    # step rows: seq 0 token p sits at row p - 5; seq 1 token p at row 7 + p.
    assert got == [(b"a", [0, 1], [2, 3]), (b"b", [4, 5], [0, 1]), (b"a", [9, 10], [0, 1])]


def test_encoder_budget_cuts_before_an_image():
    # Both images start in [0, 20): 8 features; a budget of 4 lets A start, not B.
    assert cut_before_image([A, B], 0, 20, 8, may_exceed=True) == 20
    assert cut_before_image([A, B], 0, 20, 4, may_exceed=True) == 9
    assert cut_before_image([A, B], 0, 20, 3, may_exceed=True) == 3  # A alone is over: text
    assert cut_before_image([A, B], 3, 20, 3, may_exceed=True) == 9  # A first: it may go
    assert cut_before_image([A, B], 3, 20, 3, may_exceed=False) == 3  # budget already used
    assert cut_before_image([A, B], 5, 20, 0, may_exceed=False) == 9  # A already started


def run_prompts(scheduler, prompts):
    runner = MockRunner(scheduler)
    for i, (ids, items) in enumerate(prompts):
        scheduler.add_request(str(i), ids, SamplingParams(max_tokens=1), arrival_time=i,
                              mm_items=items)  # fmt: skip
    layouts = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        layouts.append({s: n for s, n in out.num_scheduled_tokens.items()})
        scheduler.update_from_output(out, runner.execute(out))
    return layouts


def test_scheduler_keeps_each_step_within_the_encoder_budget():
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                             page_size=4, num_pages=64,
                             max_encoder_features_per_step=4)  # fmt: skip
    layouts = run_prompts(Scheduler(config), [(list(range(1, 21)), (A, B))])
    # Step 1 stops before B (A's 4 features fill the budget); step 2 starts B.
    assert layouts == [{0: 9}, {0: 11}]


def test_prefix_cache_pages_hold_the_images_they_show():
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                             page_size=4, num_pages=64)  # fmt: skip
    scheduler = Scheduler(config)
    ids = list(range(1, 21))
    run_prompts(scheduler, [(ids, (A, B))])
    bm = scheduler.block_manager

    def hits(items) -> int:
        request_id = f"probe-{items[0].key}-{items[1].key}"
        seq = scheduler.add_request(request_id, ids, SamplingParams(), arrival_time=9,
                                    mm_items=items)[0]  # fmt: skip
        found = bm.get_computed_prefix(seq)[1]
        scheduler.abort_request(seq.request_id)
        return found

    assert hits((A, B)) == 16  # every full page but the last token's
    # Another B: pages 0..1 (tokens 0..7, A's) hit; page 2 (8..11) holds B's 9, 10: miss.
    assert hits((A, item(b"c", B.positions))) == 8
    # Another A: page 0 (0..3) holds A's position 3 already: nothing hits.
    assert hits((item(b"d", A.positions), B)) == 0


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = PNG_1PX if self.path == "/small.png" else b"x" * 4096
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_urls_only_when_allowed_and_within_the_size_limit(http_server):
    url = http_server + "/small.png"
    with pytest.raises(InvalidRequestError, match="remote image URLs are refused"):
        fetch_image_bytes(url, MediaPolicy())
    assert fetch_image_bytes(url, MediaPolicy(allow_remote=True)) == PNG_1PX
    with pytest.raises(InvalidRequestError, match="exceeds 1000 bytes"):
        fetch_image_bytes(http_server + "/big", MediaPolicy(allow_remote=True, max_bytes=1000))
    with pytest.raises(InvalidRequestError, match="could not be fetched"):
        fetch_image_bytes("http://127.0.0.1:9/none.png", MediaPolicy(allow_remote=True,
                                                                     timeout_s=2))  # fmt: skip


def test_local_files_stay_inside_the_allowed_folder(tmp_path):
    inside = tmp_path / "ok" / "a.png"
    inside.parent.mkdir()
    inside.write_bytes(PNG_1PX)
    policy = MediaPolicy(allowed_local_path=str(tmp_path / "ok"))
    assert fetch_image_bytes(inside.as_uri(), policy) == PNG_1PX
    escape = "file://" + str(tmp_path / "ok" / ".." / "ok2.png")
    with pytest.raises(InvalidRequestError, match="outside the allowed folder"):
        fetch_image_bytes(escape, policy)
    with pytest.raises(InvalidRequestError, match="allows no local folder"):
        fetch_image_bytes(inside.as_uri(), MediaPolicy())
    with pytest.raises(InvalidRequestError, match="scheme 'ftp'"):
        fetch_image_bytes("ftp://host/a.png", policy)
