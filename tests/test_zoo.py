"""The model zoo: every config in configs/ has its committed checkpoint, the committed header in
mcu/models/ is exactly what the checkpoint exports to, and C matches Python on all 10,000 images."""
from pathlib import Path

import pytest

import pipeline
from checkpoint import load_checkpoint
from config import load_config, run_name
from conftest import FLOAT_TOLERANCE_IMAGES, ROOT, images_apart
from intmodel import to_int_model
from modelheader import header_layout, header_text

CONFIGS = sorted(p for p in (ROOT / 'configs').glob('*.yaml') if not p.is_symlink())   # best_<chip>: links


def test_zoo_is_not_empty():
    assert CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.stem)
def test_zoo_model_header_is_current_and_c_matches_python(mnist, config):
    checkpoint = ROOT / 'modeldata' / f'{run_name(load_config(config))}.pth'
    assert checkpoint.exists(), f"{checkpoint.name} is not committed: python training.py --params {config}"
    header = ROOT / 'mcu' / 'models' / f'{config.stem}.h'
    model, _, metrics = load_checkpoint(checkpoint)
    int_model = to_int_model(model)
    text = header.read_text()
    assert header_layout(text) == 'input-major' and text == header_text(int_model, checkpoint.name), \
        f"{header} is stale: python docs/make_results.py"
    result = pipeline.verify(model, int_model, Path(header), mnist, log=lambda *a: None)
    assert result['n'] == 10000 and result['mismatches'] == 0
    # The float model against the checkpoint's own record: float arithmetic differs between CPUs (one image
    # here, seen), so the two are compared in whole images with a tolerance, never as equal floats.
    assert images_apart(result['float_acc'], metrics['test_acc'], result['n']) <= FLOAT_TOLERANCE_IMAGES


@pytest.mark.parametrize('link', ['best_ch32v003', 'best_ch32v002'])
def test_best_model_links_name_one_zoo_model(link):
    """configs/best_<chip>.yaml and mcu/models/best_<chip>.h link to the same zoo model (what the README and
    docs/results.md call the best for that chip), which is itself in the zoo and not another link."""
    config, header = ROOT / 'configs' / f'{link}.yaml', ROOT / 'mcu' / 'models' / f'{link}.h'
    assert config.is_symlink() and header.is_symlink()
    chosen = config.resolve()
    assert chosen.parent == ROOT / 'configs' and not chosen.stem.startswith('best_')
    assert header.resolve() == ROOT / 'mcu' / 'models' / f'{chosen.stem}.h'
