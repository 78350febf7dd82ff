"""nyuv2 / cityscapes from small generated folders in the MTAN .npy layout."""

import os

import numpy as np
import pytest

from experiments.data import batches, check_example, default_dataset_config, make_dataset

H, W = 8, 12


def _write(root, split, folder, index, array):
    path = os.path.join(root, split, folder)
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, f"{index}.npy"), array)


def make_folder(root, sizes, label_folders=("label",), classes=13, normals=True, depth_2d=False):
    """MTAN layout: float images in [0, 1], float labels with -1, depth [H, W, 1], normals [H, W, 3]."""
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        for i in range(n):
            _write(root, split, "image", i, rng.random((H, W, 3)))
            label = rng.integers(-1, classes, (H, W)).astype(np.float64)
            for folder in label_folders:
                _write(root, split, folder, i, label)
            depth = rng.random((H, W, 1)) * (rng.random((H, W, 1)) > 0.2)
            _write(root, split, "depth", i, depth[..., 0] if depth_2d else depth)
            if normals:
                normal = rng.normal(size=(H, W, 3))
                _write(
                    root,
                    split,
                    "normal",
                    i,
                    normal / np.linalg.norm(normal, axis=-1, keepdims=True),
                )
    return str(root)


def test_nyuv2_reads_all_three_tasks(tmp_path):
    root = make_folder(tmp_path / "nyuv2", {"train": 5, "val": 3})
    config = default_dataset_config("nyuv2")
    config.root = root
    data = make_dataset(config)
    assert data.task_names == ("segmentation", "depth", "normals")
    assert [t.kind for t in data.tasks] == ["segmentation", "depth", "normals"]
    assert data.tasks[0].num_classes == 13
    assert (len(data.train), len(data.test), data.val) == (5, 3, None)
    assert data.input_shape == (H, W, 3)
    example = data.test[2]
    check_example(example, data.tasks, "nyuv2")
    stored = np.load(os.path.join(root, "val", "label", "2.npy"))
    np.testing.assert_array_equal(example["segmentation"], stored.astype(np.int32))
    assert (example["segmentation"] == -1).any()  # ignore pixels survive
    np.testing.assert_allclose(
        example["depth"], np.load(os.path.join(root, "val", "depth", "2.npy"))
    )
    batch = next(batches(data.train, 2, seed=0, epoch=0))
    assert batch["normals"].shape == (2, H, W, 3) and batch["segmentation"].dtype == np.int32


def test_nyuv2_downsample_and_limits(tmp_path):
    root = make_folder(tmp_path / "nyuv2", {"train": 4, "val": 2})
    config = default_dataset_config("nyuv2")
    config.update(root=root, downsample=2, max_train_examples=3, max_test_examples=1)
    data = make_dataset(config)
    assert (len(data.train), len(data.test)) == (3, 1)
    example = data.train[1]
    assert data.input_shape == (H // 2, W // 2, 3)
    image = np.load(os.path.join(root, "train", "image", "1.npy"))
    np.testing.assert_allclose(example["image"][0, 0], image[:2, :2].mean(axis=(0, 1)), rtol=1e-6)
    label = np.load(os.path.join(root, "train", "label", "1.npy"))
    np.testing.assert_array_equal(example["segmentation"], label[::2, ::2].astype(np.int32))
    assert example["depth"].shape == (H // 2, W // 2, 1)


@pytest.mark.parametrize(
    ("label_folders", "num_classes"),
    [(("label_7", "label_19"), 7), (("label_7", "label_19"), 19), (("label",), 7)],
)
def test_cityscapes_label_folders(tmp_path, label_folders, num_classes):
    root = make_folder(
        tmp_path / "cs",
        {"train": 3, "val": 2},
        label_folders,
        classes=7,
        normals=False,
        depth_2d=True,
    )
    config = default_dataset_config("cityscapes")
    config.update(root=root, num_classes=num_classes)
    data = make_dataset(config)
    assert data.task_names == ("segmentation", "depth")
    assert data.tasks[0].num_classes == num_classes
    expected = "label" if label_folders == ("label",) else f"label_{num_classes}"
    assert data.info["folders"]["segmentation"] == expected
    example = data.train[0]
    check_example(example, data.tasks, "cityscapes")
    assert "normals" not in example and example["depth"].shape == (
        H,
        W,
        1,
    )  # 2-D depth gets an axis


def test_missing_folder_says_what_to_download_and_where(tmp_path):
    config = default_dataset_config("nyuv2")
    config.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        make_dataset(config)
    message = str(error.value)
    assert "not found" in message and "nyuv2.zip" in message and "dropbox" in message
    assert "<root>/train/normal/<i>.npy" in message and "<root>/val/label/<i>.npy" in message
    assert "--config.dataset.root=" in message
    config = default_dataset_config("cityscapes")
    config.root = str(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)cityscapes2\.zip.*<root>/train/label_7/<i>\.npy"
    ):
        make_dataset(config)


def test_incomplete_or_malformed_folders_are_reported(tmp_path):
    root = make_folder(tmp_path / "a", {"train": 3, "val": 2})
    os.remove(os.path.join(root, "train", "depth", "1.npy"))
    config = default_dataset_config("nyuv2")
    config.root = root
    with pytest.raises(FileNotFoundError, match=r"depth.*does not hold files 0\.npy"):
        make_dataset(config)

    root = make_folder(tmp_path / "b", {"train": 2, "val": 2})
    np.save(os.path.join(root, "train", "image", "0.npy"), np.zeros((3, H, W)))  # channels first
    config.root = root
    with pytest.raises(ValueError, match=r"image/0\.npy: expected image of shape \[H, W, 3\]"):
        make_dataset(config)

    root = make_folder(tmp_path / "c", {"train": 2, "val": 2}, classes=40)  # 40-class labels
    config.root = root
    with pytest.raises(ValueError, match=r"outside -1\.\.12 "):
        make_dataset(config)


def test_cityscapes_rejects_an_unknown_class_count(tmp_path):
    config = default_dataset_config("cityscapes")
    config.update(root=str(tmp_path), num_classes=8)
    with pytest.raises(ValueError, match="2, 7 or 19"):
        make_dataset(config)
