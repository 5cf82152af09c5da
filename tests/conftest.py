import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / 'shared' / 'original-checkpoints'
# Float results (a float model's accuracy) differ between CPUs; they are compared in whole images, this far apart
FLOAT_TOLERANCE_IMAGES = 3


def images_apart(accuracy_a, accuracy_b, n):
    """How many of n images two accuracies differ by: a whole number, free of float rounding."""
    return abs(round(accuracy_a * n) - round(accuracy_b * n))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: trains several models, runs the firmware or a sanitizer build; '
                                       'pytest -m "not slow" is the inner loop (under a minute), make test runs all')


def original_checkpoint(name):
    """A checkpoint of the original BitNetMCU from ../shared. Outside CI a checkout without ../shared
    skips the tests that need one; in CI (CI=true) its absence is a failure."""
    path = SHARED / name
    if not path.exists():
        if os.environ.get('CI'):
            pytest.fail(f"{path} is missing: CI must provide ../shared beside the checkout")
        pytest.skip(f"{path} not present (../shared beside the checkout)")
    return path


@pytest.fixture(scope='session')
def mnist():
    """The real MNIST (fetched by `make test` before the tests run)."""
    from dataset import load_dataset
    return load_dataset('MNIST', log=lambda *a: None)


@pytest.fixture(scope='session')
def small_mnist(mnist):
    """A 3000/1000-image slice of the real MNIST: fast, still a real learning problem."""
    out = dict(mnist)
    for split, n in (('train', 3000), ('test', 1000)):
        for key in ('x28', 'x16', 'y'):
            out[f'{split}_{key}'] = mnist[f'{split}_{key}'][:n]
    return out


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """Send training.py's checkpoints and run logs into a temporary folder."""
    import training
    monkeypatch.setattr(training, 'MODEL_DIR', tmp_path / 'modeldata')
    monkeypatch.setattr(training, 'RUNS_DIR', tmp_path / 'runs')
    return tmp_path
