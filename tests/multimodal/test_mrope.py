"""M-RoPE positions on the host (multimodal/mrope.py): a step's chunks, split anywhere (inside
an image's placeholders too), get the slices of the whole prompt's positions; text-only
sequences get three equal rows; generated tokens continue after the prompt's shift."""

import numpy as np

from xlaserve.engine.input_batch import Chunk
from xlaserve.multimodal.inputs import ImageItem
from xlaserve.multimodal.mrope import mrope_positions, step_mrope_positions


def item(start: int, grid: tuple[int, int, int]) -> ImageItem:
    n = int(np.prod(grid))
    return ImageItem(b"k", np.arange(start, start + n, dtype=np.int32), np.zeros(1), 1, grid)


def test_positions_follow_the_image_grids_and_continue_after_them():
    items = [item(2, (1, 2, 3)), item(10, (1, 4, 2))]  # 6 then 8 placeholders
    pos = mrope_positions(items, 0, 20)
    # text 0, 1; image 1 at base 2: rows 0..1, columns 0..2; text resumes at 2 + 3 = 5
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:10].tolist() == [[5, 6]] * 3
    # image 2 at base 7: 4 rows, 2 columns; text resumes at 7 + 4 = 11
    assert pos[1, 10:18].tolist() == [7, 7, 8, 8, 9, 9, 10, 10]
    assert pos[:, 18:].tolist() == [[11, 12]] * 3
    # decode past the prompt: position + the same shift
    assert mrope_positions(items, 25, 1)[:, 0].tolist() == [18] * 3


def test_chunks_split_inside_images_get_slices_of_the_whole():
    items = [item(3, (1, 4, 4))]
    whole = mrope_positions(items, 0, 30)
    chunks = [Chunk(7, list(range(n)), s, [], True) for s, n in ((0, 5), (5, 9), (14, 16))]
    step = step_mrope_positions(chunks, 32, lambda seq_id: items)
    np.testing.assert_array_equal(step[:, :30], whole)
    assert (step[:, 30:] == 0).all()  # padding


def test_text_only_sequences_have_three_equal_rows():
    pos = mrope_positions((), 4, 5)
    assert pos.tolist() == [[4, 5, 6, 7, 8]] * 3
