"""Sources, index splits, the two-item overlay and image helpers of experiments.data."""

import io

import numpy as np
import pytest
from PIL import Image

from experiments.data import ArraySource, check_example, first_n, stratified_split, take
from experiments.data.images import decode_resized, resize_uint8, to_unit_float
from experiments.data.overlay import compose, make_pair_plan
from experiments.tasks import TaskSpec


def _arrays(n=10):
    return {
        "image": np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2, 1),
        "y": np.arange(n, dtype=np.int32),
    }


# ----- sources -----------------------------------------------------------------------------------


def test_array_source_indexes_every_array():
    src = ArraySource(_arrays())
    assert len(src) == 10
    example = src[3]
    assert example["y"] == 3 and example["image"].shape == (2, 2, 1)
    assert src[-1]["y"] == 9
    with pytest.raises(IndexError, match="out of range"):
        src[10]


def test_array_source_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_take_and_first_n_select_without_copying_semantics_change():
    src = ArraySource(_arrays())
    picked = take(src, [7, 2, 2])
    assert [int(picked[i]["y"]) for i in range(3)] == [7, 2, 2]
    assert [int(first_n(src, 4)[i]["y"]) for i in range(4)] == [0, 1, 2, 3]
    assert first_n(src, 0) is src and first_n(src, 99) is src
    with pytest.raises(ValueError, match=">= 0"):
        first_n(src, -1)
    with pytest.raises(IndexError):
        take(src, [10])


def test_take_of_a_lazy_source_reads_only_on_access():
    reads = []

    class Lazy:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            reads.append(i)
            return {"y": i}

    view = take(Lazy(), [4, 0])
    assert reads == [] and len(view) == 2
    assert view[0] == {"y": 4} and reads == [4]


# ----- stratified split --------------------------------------------------------------------------


def test_stratified_split_is_a_stratified_partition():
    labels = np.repeat(np.arange(5), [100, 40, 20, 60, 80])
    parts = stratified_split(labels, (0.7, 0.15, 0.15), seed=3)
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(len(labels)))  # a partition
    for part, fraction in zip(parts, (0.7, 0.15, 0.15), strict=True):
        counts = np.bincount(labels[part], minlength=5)
        np.testing.assert_allclose(counts, fraction * np.bincount(labels), atol=1)


def test_stratified_split_depends_only_on_the_seed():
    labels = np.arange(200) % 7
    a = stratified_split(labels, (0.8, 0.2), seed=1)
    b = stratified_split(labels, (0.8, 0.2), seed=1)
    c = stratified_split(labels, (0.8, 0.2), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.2, -0.2)])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(np.zeros(10), fractions, seed=0)


# ----- example checks ----------------------------------------------------------------------------


def test_check_example_names_the_bad_key():
    tasks = (TaskSpec("a", "classification", 3), TaskSpec("seg", "segmentation", 4))
    good = {
        "image": np.zeros((4, 4, 3), np.float32),
        "a": np.int32(1),
        "seg": np.zeros((4, 4), np.int32),
    }
    check_example(good, tasks, "here")
    with pytest.raises(ValueError, match=r"here: example has no 'seg'"):
        check_example({k: v for k, v in good.items() if k != "seg"}, tasks, "here")
    with pytest.raises(ValueError, match=r"example\['a'\] is int64"):
        check_example({**good, "a": np.int64(1)}, tasks, "here")


# ----- overlay -----------------------------------------------------------------------------------


def test_compose_places_items_at_opposite_corners_with_max_overlap():
    left = np.full((4, 4, 1), 3, np.uint8)
    right = np.full((4, 4, 1), 5, np.uint8)
    right[0, 0] = 1
    canvas = compose(left, right, (1, 0), (0, 2), canvas_size=7)
    assert canvas.shape == (7, 7, 1) and canvas.dtype == np.uint8
    # left occupies rows 1..4, cols 0..3; right occupies rows 3..6, cols 1..4
    assert canvas[1, 0, 0] == 3 and canvas[0, 0, 0] == 0
    assert canvas[6, 4, 0] == 5 and canvas[6, 6, 0] == 0
    assert canvas[3, 1, 0] == 3  # overlap: max(3, right's corner 1)
    assert canvas[4, 2, 0] == 5  # overlap: max(3, 5)


def test_compose_rejects_items_that_do_not_fit():
    item = np.zeros((4, 4, 1))
    with pytest.raises(ValueError, match="do not fit"):
        compose(item, item, (3, 0), (0, 0), canvas_size=6)
    with pytest.raises(ValueError, match="square"):
        compose(item, np.zeros((4, 5, 1)), (0, 0), (0, 0), canvas_size=8)


def test_pair_plan_is_seeded_and_within_bounds():
    a = make_pair_plan(500, 7, 9, max_shift=3, seed=5)
    b = make_pair_plan(500, 7, 9, max_shift=3, seed=5)
    assert np.array_equal(a.left, b.left) and np.array_equal(a.right_shift, b.right_shift)
    assert a.left.max() < 7 and a.right.max() < 9 and len(a) == 500
    assert set(np.unique(a.left_shift)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="non-empty pools"):
        make_pair_plan(5, 0, 3, 1, 0)


# ----- images ------------------------------------------------------------------------------------


def test_resize_and_unit_scaling():
    image = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    small = resize_uint8(image, (8, 6))
    assert small.shape == (8, 6, 3) and small.dtype == np.uint8
    assert np.array_equal(resize_uint8(image, (8, 6)), small)  # deterministic
    grey = resize_uint8(image[..., :1], (5, 5))
    assert grey.shape == (5, 5, 1)
    unit = to_unit_float(np.array([[[0, 255]]], np.uint8))
    assert unit.dtype == np.float32 and unit.tolist() == [[[0.0, 1.0]]]


def test_decode_resized_reads_jpeg_bytes_close_to_a_full_decode():
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (6, 9, 3)), np.ones((40, 40, 1))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    from_bytes = decode_resized(data, (24, 36))
    full = resize_uint8(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), (24, 36))
    assert from_bytes.shape == (24, 36, 3) and from_bytes.dtype == np.uint8
    assert np.abs(from_bytes.astype(int) - full.astype(int)).mean() < 4
    assert np.array_equal(decode_resized(np.bytes_(data), (24, 36)), from_bytes)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        decode_resized(np.zeros((4, 4, 1), np.uint8), (2, 2))
