"""The model zoo: every config in configs/ has its committed checkpoint, the committed header in
mcu/models/ is exactly what the checkpoint exports to, and C matches Python on all 10,000 images."""
import sys
from pathlib import Path

import pytest

import pipeline
from checkpoint import load_checkpoint
from config import RUN_INDEPENDENT, load_config, run_name
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


def make_results():
    sys.path.insert(0, str(ROOT / 'docs'))
    import make_results
    return make_results


@pytest.mark.parametrize('link', ['best_ch32v003', 'best_ch32v002'])
def test_best_model_links_name_one_zoo_model(link):
    """configs/best_<chip>.yaml and mcu/models/best_<chip>.h link to the same zoo model (what the README and
    docs/results.md call the best for that chip), one make_results measures."""
    m = make_results()
    assert link in m.BEST and m.best_model(link) in m.ORIGINAL


def test_a_best_link_to_two_models_is_refused(tmp_path):
    configs, models = tmp_path / 'configs', tmp_path / 'models'
    configs.mkdir()
    models.mkdir()
    for name in ('a', 'b'):
        (configs / f'{name}.yaml').write_text('model: FCMNIST\n')
        (models / f'{name}.h').write_text('')
    (configs / 'best_x.yaml').symlink_to('a.yaml')
    (models / 'best_x.h').symlink_to('a.h')
    assert make_results().best_model('best_x', configs, models) == 'a'
    (models / 'best_x.h').unlink()
    (models / 'best_x.h').symlink_to('b.h')
    with pytest.raises(SystemExit, match='must link to one zoo model'):
        make_results().best_model('best_x', configs, models)


@pytest.mark.parametrize('seed', sorted(make_results().SEEDS.glob('*.pth')), ids=lambda p: p.stem)
def test_each_zoo_seed_is_its_config_with_another_seed(seed):
    """docs/make_results.py reports a zoo config's mean over modeldata/seeds/<config>_s<N>.pth: each must be that
    config trained with seed N (any runtag), or the mean is of another model."""
    name, n = make_results().seed_file_names(seed)
    config = ROOT / 'configs' / f'{name}.yaml'
    assert config.exists() and not config.is_symlink(), f"{seed.name} names no zoo config ({config.name})"
    _, trained, _ = load_checkpoint(seed)
    expected = load_config(config, {'seed': n})
    differ = sorted(k for k in expected if k not in ('runtag', *RUN_INDEPENDENT) and trained.get(k) != expected[k])
    assert not differ, f"{seed.name} was trained with other {differ} than {config.name}"


def test_make_results_measures_again_only_when_a_model_or_its_header_changed(tmp_path, monkeypatch):
    """The cache in build/make_results/: a second run reuses the row, a new key (checkpoint, seeds, sources,
    tools), an edited header, a damaged cache file or --fresh measure again."""
    m = make_results()
    measured = []
    monkeypatch.setattr(m, 'CACHE', tmp_path / 'cache')
    monkeypatch.setattr(m, 'MODELS', tmp_path / 'models')
    (tmp_path / 'models').mkdir()
    header = tmp_path / 'models' / 'fc_2bitsym_16x2.h'
    header.write_text('// header\n')
    monkeypatch.setattr(m, 'measure_row', lambda name, *a: measured.append(name) or {'name': name, 'run': len(measured)})
    key = ['a']
    monkeypatch.setattr(m, 'measurement_key', lambda checkpoint, seeds, environment: key[0])
    runs = [m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] for _ in range(2)]
    assert runs == [1, 1]
    key[0] = 'b'
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] == 2
    header.write_text('// edited by hand\n')
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] == 3
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env', fresh=True)['run'] == 4
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] == 4
    (tmp_path / 'cache' / 'fc_2bitsym_16x2.json').write_text('{"key": "b", "head')
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] == 5
    assert m.measure('fc_2bitsym_16x2', None, tmp_path, 'env')['run'] == 5


def test_make_results_key_covers_the_checkpoint_and_the_engine(tmp_path, monkeypatch):
    m = make_results()
    a, b = tmp_path / 'a.pth', tmp_path / 'b.pth'
    a.write_bytes(b'weights')
    b.write_bytes(b'weightz')
    environment = m.environment_digest()
    assert m.measurement_key(a, [], environment) == m.measurement_key(a, [], environment)
    assert m.measurement_key(a, [], environment) != m.measurement_key(b, [], environment)
    assert m.measurement_key(a, [], environment) != m.measurement_key(a, [b], environment)
    real = m.file_digest
    for source in (ROOT / 'BitNetMCU_inference.c', ROOT / 'docs' / 'make_results.py'):
        monkeypatch.setattr(m, 'file_digest', lambda p, source=source: 'edited' if Path(p) == source else real(p))
        edited = m.environment_digest()
        assert edited != environment
        assert m.measurement_key(a, [], edited) != m.measurement_key(a, [], environment)
