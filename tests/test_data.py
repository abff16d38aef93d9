"""Tests for pilot.data on small synthetic datasets written to tmp_path (and on the real
Fashion-MNIST files when Debian's dataset-fashion-mnist package is installed)."""

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

import pilot.data.class_folders as class_folders
import pilot.data.fashion_mnist as fashion_mnist
from pilot.data import DATASET_NAMES, DatasetBundle, load_datasets, make_loaders
from pilot.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx_images, read_idx_labels

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own PILOT_CACHE, so none writes to the home directory."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PILOT_CACHE", str(cache))
    return cache


@pytest.fixture
def no_system_fashion_mnist(tmp_path, monkeypatch):
    """Replace the system Fashion-MNIST directory by an empty one, so only `root` is searched."""
    system_dir = tmp_path / "no-system-fashion-mnist"
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (system_dir,))
    return system_dir


# ---------------------------------------------------------------- Fashion-MNIST / idx


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes, compress: bool) -> Path:
    path = path.with_name(path.name + ".gz") if compress else path
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion_mnist(directory: Path, n_train: int = 30, n_test: int = 20, size: int = 28, compress: bool = True):
    """Random idx files in `directory`; returns {stem: array written}."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        write_file(directory / stem, idx_bytes(magic, array), compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_reader_round_trips_exactly(tmp_path, compress):
    arrays = write_fashion_mnist(tmp_path, n_train=5, n_test=3, size=6, compress=compress)
    suffix = ".gz" if compress else ""
    images = read_idx_images(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = read_idx_labels(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.dtype == torch.uint8 and labels.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]))


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_fashion_mnist_bundle_holds_the_files_content(tmp_path, compress, no_system_fashion_mnist):
    arrays = write_fashion_mnist(tmp_path / "fm", compress=compress)
    bundle = load_datasets("fashion-mnist", tmp_path / "fm", augment=False)
    assert isinstance(bundle, DatasetBundle)
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == ("fashion-mnist", 10, 1, 28)
    assert bundle.source == str(tmp_path / "fm")
    assert len(bundle.train) == 30 and len(bundle.test) == 20
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(bundle.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())

    image, label = bundle.train[3]
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).float() / 255 - 0.2860) / 0.3530
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.allclose(image[0], expected, atol=1e-5)
    assert isinstance(label, int) and label == arrays["train-labels-idx1-ubyte"][3]


def test_fashion_mnist_found_in_torchvision_layout_under_parent(tmp_path, no_system_fashion_mnist):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    bundle = load_datasets("fashion-mnist", tmp_path)
    assert bundle.source == str(tmp_path / "FashionMNIST" / "raw")


def test_fashion_mnist_augmentation_only_on_train(tmp_path, no_system_fashion_mnist):
    write_fashion_mnist(tmp_path)
    plain = load_datasets("fashion-mnist", tmp_path, augment=False)
    augmented = load_datasets("fashion-mnist", tmp_path, augment=True)
    torch.manual_seed(0)
    draws = [augmented.train[0][0] for _ in range(20)]
    assert all(draw.shape == (1, 28, 28) for draw in draws)
    assert any(not torch.equal(draw, plain.train[0][0]) for draw in draws)
    assert all(torch.equal(augmented.test[0][0], plain.test[0][0]) for _ in range(5))


@pytest.mark.parametrize(
    "stem,corrupt,message",
    [
        ("train-images-idx3-ubyte", lambda data: (1234).to_bytes(4, "big") + data[4:], "wrong idx magic number 1234"),
        ("train-labels-idx1-ubyte", lambda data: (2051).to_bytes(4, "big") + data[4:], "wrong idx magic number 2051"),
        ("t10k-images-idx3-ubyte", lambda data: data[:-7], "truncated idx file"),
        ("t10k-images-idx3-ubyte", lambda data: data[:10], "truncated idx header"),
        ("t10k-labels-idx1-ubyte", lambda data: data + b"\0\0", "2 unexpected trailing bytes"),
    ],
)
def test_corrupt_idx_file_raises_value_error_naming_it(tmp_path, no_system_fashion_mnist, stem, corrupt, message):
    write_fashion_mnist(tmp_path, compress=False)
    path = tmp_path / stem
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        load_datasets("fashion-mnist", tmp_path)
    assert str(path) in str(error.value)


def test_truncated_gzip_raises_value_error_naming_it(tmp_path, no_system_fashion_mnist):
    write_fashion_mnist(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as error:
        load_datasets("fashion-mnist", tmp_path)
    assert str(path) in str(error.value)


def test_image_label_count_mismatch_names_both_files(tmp_path, no_system_fashion_mnist):
    write_fashion_mnist(tmp_path, compress=False)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(IDX_LABELS_MAGIC, np.zeros(29, dtype=np.uint8)))
    with pytest.raises(ValueError, match="30 images but .* 29 labels") as error:
        load_datasets("fashion-mnist", tmp_path)
    assert str(labels_path) in str(error.value) and str(tmp_path / "train-images-idx3-ubyte") in str(error.value)


def test_label_out_of_range_is_rejected(tmp_path, no_system_fashion_mnist):
    write_fashion_mnist(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(IDX_LABELS_MAGIC, np.full(20, 10, dtype=np.uint8)))
    with pytest.raises(ValueError, match="label 10 out of range"):
        load_datasets("fashion-mnist", tmp_path)


def test_missing_fashion_mnist_lists_every_place_and_how_to_get_it(tmp_path, no_system_fashion_mnist):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # a partial directory is reported, not used
    with pytest.raises(FileNotFoundError) as error:
        load_datasets("fashion-mnist", tmp_path)
    message = str(error.value)
    for place in (tmp_path, tmp_path / "FashionMNIST" / "raw", tmp_path / "fashion-mnist"):
        assert f"{place}:" in message
    assert f"{no_system_fashion_mnist}:" not in message  # an explicit root never falls back to another copy
    assert "missing train-labels-idx1-ubyte[.gz]" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    with pytest.raises(FileNotFoundError, match=f"{no_system_fashion_mnist}: no such directory"):
        load_datasets("fashion-mnist")  # without a root: the system copy is where it looks


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist package not installed")
def test_real_fashion_mnist_files():
    bundle = load_datasets("fashion-mnist")
    assert bundle.source == str(REAL_FASHION_MNIST)
    assert bundle.train.images.shape == (60000, 1, 28, 28) and bundle.test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(bundle.train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(bundle.test.labels.bincount(), torch.full((10,), 1000))
    pixels = bundle.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3530, abs=5e-4)


# ---------------------------------------------------------------- CIFAR


def write_class_folders(root: Path, classes, n_train: int = 3, n_test: int = 2, size: int = 32, fmt: str = "png"):
    """Random images under root/{train,test}/<class>/; returns {split: [(class index, HxWx3 array)]}
    in the order the loader must produce (class index, then file name)."""
    rng = np.random.default_rng(1)
    written: dict[str, list[tuple[int, np.ndarray]]] = {"train": [], "test": []}
    for split, count in (("train", n_train), ("test", n_test)):
        for label, class_name in enumerate(classes):
            (root / split / class_name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / class_name / f"{i:04d}.{fmt}")
                written[split].append((label, pixels))
    return written


def make_archive(tree: Path, archive_path: Path, prefix: str = "") -> Path:
    with tarfile.open(archive_path, "w:gz") as archive:
        # Reverse order: the loader must sort, not trust the archive's order.
        for path in sorted(tree.rglob("*"), reverse=True):
            if path.is_file():
                archive.add(path, arcname=prefix + str(path.relative_to(tree)))
    return archive_path


def assert_matches_written(bundle: DatasetBundle, written) -> None:
    for dataset, split in ((bundle.train, "train"), (bundle.test, "test")):
        expected_images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for _, p in written[split]])
        assert torch.equal(dataset.images, expected_images)
        assert dataset.labels.tolist() == [label for label, _ in written[split]]


def test_cifar_class_folder_directory_is_read_exactly(tmp_path):
    written = write_class_folders(tmp_path / "tree", CIFAR10_CLASSES)
    bundle = load_datasets("cifar10", tmp_path / "tree", augment=False)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.classes == tuple(CIFAR10_CLASSES)
    assert len(bundle.train) == 30 and len(bundle.test) == 20
    assert_matches_written(bundle, written)
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def test_cifar_archive_is_decoded_once_then_served_from_cache(tmp_path, isolated_cache, monkeypatch):
    written = write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, fmt="png")
    archive = make_archive(tmp_path / "tree", tmp_path / "cifar10-png.tar.gz", prefix="cifar10/")
    first = load_datasets("cifar10", archive, augment=False)
    assert first.source == str(archive)
    assert_matches_written(first, written)
    (cache_file,) = isolated_cache.glob("class-folders-cifar10-png-*.pt")
    assert not list(isolated_cache.glob(".*.tmp")), "temp file left behind by the atomic write"
    cache_mtime = cache_file.stat().st_mtime_ns

    def fail_decode(data, name):
        raise AssertionError(f"decoded {name} again despite the cache")

    monkeypatch.setattr(class_folders, "_decode_image", fail_decode)
    second = load_datasets("cifar10", archive, augment=False)
    assert_matches_written(second, written)
    assert cache_file.stat().st_mtime_ns == cache_mtime


def test_changed_archive_gets_a_new_cache_entry(tmp_path, isolated_cache):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    archive = make_archive(tmp_path / "tree", tmp_path / "cifar10.tar.gz")
    load_datasets("cifar10", archive)
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    load_datasets("cifar10", archive)
    assert len(list(isolated_cache.glob("class-folders-*.pt"))) == 2


def test_unreadable_cache_file_is_rebuilt_with_a_warning(tmp_path, isolated_cache):
    written = write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    archive = make_archive(tmp_path / "tree", tmp_path / "cifar10.tar.gz")
    load_datasets("cifar10", archive)
    (cache_file,) = isolated_cache.glob("class-folders-*.pt")
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        bundle = load_datasets("cifar10", archive, augment=False)
    assert_matches_written(bundle, written)
    assert cache_file.stat().st_size > 1000


def test_cifar_archive_found_from_parent_directory(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1, fmt="jpg")
    data_root = tmp_path / "data"
    data_root.mkdir()
    # A CIFAR-100 archive must not be mistaken for CIFAR-10 although its name starts with "cifar10".
    (data_root / "cifar100.tar.gz").write_bytes(b"")
    archive = make_archive(tmp_path / "tree", data_root / "cifar10-jpeg.tar.gz")
    bundle = load_datasets("cifar10", data_root)
    assert bundle.source == str(archive)
    assert len(bundle.train) == 10 and bundle.train.images.shape[1:] == (3, 32, 32)


def test_class_mapping_mismatch_between_train_and_test_is_an_error(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    (tmp_path / "tree" / "test" / "truck").rename(tmp_path / "tree" / "test" / "lorry")
    with pytest.raises(ValueError, match=r"only in train: \['truck'\], only in test: \['lorry'\]"):
        load_datasets("cifar10", tmp_path / "tree")
    archive = make_archive(tmp_path / "tree", tmp_path / "cifar10.tar.gz")
    with pytest.raises(ValueError, match="different class folders"):
        load_datasets("cifar10", archive)


def test_wrong_number_of_classes_is_an_error(tmp_path):
    write_class_folders(tmp_path / "tree", ["cat", "dog", "frog"], n_train=1, n_test=1)
    with pytest.raises(ValueError, match="cifar10 needs 10 classes, found 3"):
        load_datasets("cifar10", tmp_path / "tree")


def test_undecodable_image_is_named(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    (tmp_path / "tree" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    archive = make_archive(tmp_path / "tree", tmp_path / "cifar10.tar.gz")
    with pytest.raises(ValueError, match=r"cifar10\.tar\.gz:train/cat/broken\.png: cannot decode image"):
        load_datasets("cifar10", archive)


def test_images_of_different_sizes_are_rejected(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    Image.new("RGB", (30, 30)).save(tmp_path / "tree" / "test" / "dog" / "small.png")
    with pytest.raises(ValueError, match="small.png: image is 30x30, but earlier images are 32x32"):
        load_datasets("cifar10", tmp_path / "tree")


def test_grayscale_images_are_converted_to_rgb(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=1, n_test=1)
    Image.new("L", (32, 32), color=77).save(tmp_path / "tree" / "train" / "airplane" / "0000.png")
    bundle = load_datasets("cifar10", tmp_path / "tree")
    assert torch.all(bundle.train.images[0] == 77)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_cifar_pickles(root: Path, name: str, n_per_batch: int = 4):
    """A tiny dataset in torchvision's pickled-batch layout; returns (train images, train labels, test ...)."""
    rng = np.random.default_rng(2)
    num_classes = 10 if name == "cifar10" else 100
    directory = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    directory.mkdir(parents=True)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    batches = {}
    for file_name in [*train_files, "test_batch" if name == "cifar10" else "test"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n_per_batch).tolist()
        batches[file_name] = (data, labels)
        (directory / file_name).write_bytes(pickle.dumps({"data": data, label_key: labels, "filenames": []}))
    meta_name, names_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    (directory / meta_name).write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(num_classes)]}))
    return directory, train_files, batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_torchvision_pickle_layout_is_read_exactly(tmp_path, name):
    directory, train_files, batches = write_cifar_pickles(tmp_path, name)
    bundle = load_datasets(name, tmp_path, augment=False)
    assert bundle.source == str(directory)
    assert bundle.num_classes == (10 if name == "cifar10" else 100) and bundle.classes[1] == "class1"
    expected_train = np.concatenate([batches[f][0] for f in train_files]).reshape(-1, 3, 32, 32)
    assert torch.equal(bundle.train.images, torch.from_numpy(expected_train))
    assert bundle.train.labels.tolist() == sum((batches[f][1] for f in train_files), [])
    assert len(bundle.test) == 4


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    directory, _, _ = write_cifar_pickles(tmp_path, "cifar10")
    (directory / "data_batch_3").write_bytes(pickle.dumps({"data": _Exploit(), "labels": []}))
    with pytest.raises(
        ValueError, match=r"data_batch_3: not a valid CIFAR pickle batch \(refusing to load posix.system"
    ):
        load_datasets("cifar10", directory)


def test_missing_cifar_lists_places_and_how_to_get_it(tmp_path):
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_datasets("cifar10", tmp_path)
    message = str(error.value)
    for place in (tmp_path / "cifar-10-batches-py", tmp_path, tmp_path / "cifar10"):
        assert f"{place}:" in message
    assert "torchvision.datasets.CIFAR10(ROOT, download=True)" in message and "--data-root" in message
    with pytest.raises(FileNotFoundError, match="pass --data-root"):
        load_datasets("cifar100")


def test_limit_keeps_a_deterministic_class_mixed_subset(tmp_path):
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=4, n_test=2)
    full = load_datasets("cifar10", tmp_path / "tree")
    limited = load_datasets("cifar10", tmp_path / "tree", limit=12)
    again = load_datasets("cifar10", tmp_path / "tree", limit=12)
    assert len(limited.train) == 12 and len(limited.test) == 12
    assert torch.equal(limited.train.images, again.train.images)
    assert len(set(limited.train.labels.tolist())) >= 4, "the first 12 would hold only 3 classes"
    full_rows = {bytes(image.flatten().numpy()) for image in full.train.images}
    assert all(bytes(image.flatten().numpy()) in full_rows for image in limited.train.images)
    assert len(load_datasets("cifar10", tmp_path / "tree", limit=1000).train) == 40


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_invalid_limit_is_rejected(tmp_path, limit):
    with pytest.raises(ValueError, match="limit must be None or a positive int"):
        load_datasets("cifar10", tmp_path, limit=limit)


def test_unknown_dataset_lists_valid_names():
    assert DATASET_NAMES == ("fashion-mnist", "cifar10", "cifar100", "imagenet")
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; valid names: fashion-mnist, cifar10, cifar100, imagenet"
    ):
        load_datasets("mnist")


# ---------------------------------------------------------------- loaders


@pytest.fixture
def small_cifar(tmp_path) -> Path:
    write_class_folders(tmp_path / "tree", CIFAR10_CLASSES, n_train=5, n_test=2)
    return tmp_path / "tree"


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_loaders_yield_batches_of_the_right_shape_and_dtype(small_cifar):
    bundle = load_datasets("cifar10", small_cifar)
    train_loader, test_loader = make_loaders(bundle, batch_size=8)
    images, labels = next(iter(train_loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
    assert not train_loader.pin_memory and not train_loader.persistent_workers
    _, test_labels = epoch(test_loader)
    assert torch.equal(test_labels, bundle.test.labels), "test loader must keep dataset order"


def test_same_seed_gives_the_same_epochs_and_different_seed_differs(small_cifar):
    bundle = load_datasets("cifar10", small_cifar, augment=False)
    first, _ = make_loaders(bundle, batch_size=16, seed=3)
    second, _ = make_loaders(bundle, batch_size=16, seed=3)
    other, _ = make_loaders(bundle, batch_size=16, seed=4)
    first_epochs = [epoch(first)[1] for _ in range(2)]
    assert not torch.equal(first_epochs[0], first_epochs[1]), "each epoch reshuffles"
    assert all(torch.equal(a, epoch(second)[1]) for a in first_epochs)
    assert not torch.equal(first_epochs[0], epoch(other)[1])


def test_augmented_epochs_reproduce_given_the_documented_rng_state(small_cifar):
    bundle = load_datasets("cifar10", small_cifar, augment=True)
    loader, _ = make_loaders(bundle, batch_size=16, seed=0)
    torch.manual_seed(0)
    epoch(loader)
    # Checkpoint at the epoch boundary as make_loaders documents ...
    saved_generator, saved_global = loader.generator.get_state(), torch.get_rng_state()
    expected_images, expected_labels = epoch(loader)
    # ... and resume from it in a fresh loader.
    resumed, _ = make_loaders(bundle, batch_size=16, seed=123)
    resumed.generator.set_state(saved_generator)
    torch.set_rng_state(saved_global)
    images, labels = epoch(resumed)
    assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)


def test_resumed_epoch_with_workers_augments_as_the_uninterrupted_one(small_cifar):
    """Worker seeds are drawn from the loader's generator at every epoch, so its saved state is enough."""
    bundle = load_datasets("cifar10", small_cifar, augment=True)
    loader, _ = make_loaders(bundle, batch_size=16, num_workers=2, seed=0)
    epoch(loader)
    saved_generator = loader.generator.get_state()
    expected_images, expected_labels = epoch(loader)
    resumed, _ = make_loaders(bundle, batch_size=16, num_workers=2, seed=123)
    resumed.generator.set_state(saved_generator)
    images, labels = epoch(resumed)
    assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)


def test_worker_augmentation_is_reproducible_from_the_seed(small_cifar):
    bundle = load_datasets("cifar10", small_cifar, augment=True)
    runs = []
    for global_seed in (1, 2):  # worker seeds come from the loader's generator, not the global RNG
        torch.manual_seed(global_seed)
        loader, test_loader = make_loaders(bundle, batch_size=16, num_workers=2, seed=5)
        assert not loader.persistent_workers and test_loader.persistent_workers  # see make_loaders
        runs.append(epoch(loader))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_cuda_device_pins_memory(small_cifar):
    bundle = load_datasets("cifar10", small_cifar)
    train_loader, test_loader = make_loaders(bundle, batch_size=4, device="cuda:0")
    assert train_loader.pin_memory and test_loader.pin_memory


def test_lone_last_training_example_is_dropped_for_batchnorm(small_cifar):
    bundle = load_datasets("cifar10", small_cifar, limit=49)
    train_loader, _ = make_loaders(bundle, batch_size=8)  # 49 = 6 * 8 + 1
    assert [len(labels) for _, labels in train_loader] == [8] * 6
    train_loader, _ = make_loaders(bundle, batch_size=10)  # 49 = 4 * 10 + 9
    assert [len(labels) for _, labels in train_loader] == [10] * 4 + [9]


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 4, "num_workers": -1}])
def test_make_loaders_rejects_bad_arguments(small_cifar, kwargs):
    bundle = load_datasets("cifar10", small_cifar)
    with pytest.raises(ValueError, match="batch_size|num_workers"):
        make_loaders(bundle, **kwargs)


# ---------------------------------------------------------------- ImageNet


def write_imagenet(root: Path, train_classes=("n01", "n02"), val_classes=("n01", "n02")):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for class_name in classes:
            (root / split / class_name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (48, 40), color=(i * 50, 80, 120)).save(root / split / class_name / f"{i}.JPEG")


def test_imagenet_folders_give_224_crops(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    bundle = load_datasets("imagenet", tmp_path)
    assert bundle.source == str(tmp_path / "imagenet")
    assert (bundle.num_classes, bundle.image_size, bundle.classes) == (2, 224, ("n01", "n02"))
    for dataset in (bundle.train, bundle.test):
        image, label = dataset[3]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 1
    limited = load_datasets("imagenet", tmp_path / "imagenet", limit=3)
    assert isinstance(limited.train, Subset) and len(limited.train) == 3


def test_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)no train/ or val/ directory.*imagenet: no train/"):
        load_datasets("imagenet", tmp_path)
    write_imagenet(tmp_path, val_classes=("n01", "n03"))
    with pytest.raises(ValueError, match=r"only in train: \['n02'\], only in val: \['n03'\]"):
        load_datasets("imagenet", tmp_path)
