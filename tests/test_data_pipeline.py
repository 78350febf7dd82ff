"""experiments.data.batches: seeded epochs, resuming mid-epoch without reading skipped data."""

import numpy as np
import pytest

from experiments.data import ArraySource, batches, epoch_seed, num_batches


class CountingSource:
    """Example i is ``{"x": float32[2] = (i, -i), "y": int32 i}``; records which were read."""

    def __init__(self, n):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(int(i))
        return {"x": np.array([i, -i], np.float32), "y": np.int32(i)}


def _ids(iterator):
    return [b["y"].tolist() for b in iterator]


def test_an_epoch_is_a_permutation_cut_into_batches():
    got = list(batches(CountingSource(23), 5, seed=0, epoch=0))
    assert len(got) == num_batches(CountingSource(23), 5) == 4
    assert got[0]["x"].shape == (5, 2) and got[0]["x"].dtype == np.float32
    assert got[0]["y"].dtype == np.int32
    seen = np.concatenate([b["y"] for b in got])
    assert len(set(seen.tolist())) == 20  # no repeats; 3 dropped by drop_remainder


def test_same_seed_and_epoch_same_batches_and_fresh_permutation_per_epoch():
    src = CountingSource(40)
    first = _ids(batches(src, 8, seed=3, epoch=0))
    assert first == _ids(batches(src, 8, seed=3, epoch=0))
    assert first != _ids(batches(src, 8, seed=3, epoch=1))
    assert first != _ids(batches(src, 8, seed=4, epoch=0))
    assert first != [list(range(i, i + 8)) for i in range(0, 40, 8)]  # actually shuffled


def test_start_batch_resumes_exactly_without_reading_the_skipped_examples():
    src = CountingSource(50)
    full = _ids(batches(src, 7, seed=1, epoch=2))
    src.reads.clear()
    resumed = _ids(batches(src, 7, seed=1, epoch=2, start_batch=4))
    assert resumed == full[4:]
    assert sorted(src.reads) == sorted(i for batch in full[4:] for i in batch)


def test_unshuffled_evaluation_keeps_order_and_the_remainder():
    src = CountingSource(11)
    got = _ids(batches(src, 4, seed=0, epoch=0, shuffle=False, drop_remainder=False))
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert num_batches(src, 4, drop_remainder=False) == 3


def test_threaded_reading_gives_the_same_batches():
    src = ArraySource({"y": np.arange(64, dtype=np.int32)})
    plain = _ids(batches(src, 8, seed=5, epoch=1, start_batch=2))
    threaded = _ids(batches(src, 8, seed=5, epoch=1, start_batch=2, num_threads=2))
    assert plain == threaded


def test_epoch_seed_mixes_seed_and_epoch():
    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    assert epoch_seed(2, 3) == epoch_seed(2, 3)
    assert 0 <= epoch_seed(7, 7) < 2**32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "positive integer"),
        ({"batch_size": 4, "start_batch": 3}, r"outside \[0, 2\]"),
        ({"batch_size": 4, "epoch": -1}, ">= 0"),
        ({"batch_size": 20}, "fewer than batch_size"),
    ],
)
def test_bad_arguments_are_reported(kwargs, message):
    kwargs = {"seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        batches(CountingSource(10), **kwargs)


def test_array_sources_give_the_same_batches_as_the_per_example_path():
    arrays = {
        "x": np.stack([np.arange(37), -np.arange(37)], 1).astype(np.float32),
        "y": np.arange(37, dtype=np.int32),
    }
    fast = ArraySource(arrays)
    slow = CountingSource(37)
    for kwargs in (
        {"seed": 2, "epoch": 3},
        {"seed": 2, "epoch": 3, "start_batch": 2},
        {"seed": 0, "epoch": 0, "shuffle": False, "drop_remainder": False},
    ):
        a, b = list(batches(fast, 6, **kwargs)), list(batches(slow, 6, **kwargs))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x["x"], y["x"])
            np.testing.assert_array_equal(x["y"], y["y"])
