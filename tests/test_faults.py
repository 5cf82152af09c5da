"""Faults a careful user still meets (issue 29): planted checkpoints, outputs onto inputs, stale builds,
sweeps changed under a study, and inputs that are not what they claim. Each case asserts the exit status,
the one-line message, and that nothing was lost, replaced or executed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cengine
import sweep
import test_inference
import testdata
import training
from BitNetMCU import build_model
from checkpoint import CHECKPOINT_FORMAT
from config import load_config, run_name, validate_config
from conftest import ROOT
from test_bad_inputs import FAST, export, one_line_error, trained  # noqa: F401 (trained: a fixture)
from test_sweep import TINY, write_sweep

MCU = ROOT / 'mcu'
PY = sys.executable


def fast_args(*extra):
    return [arg for key, value in FAST.items() for arg in ('--set', f'{key}={value}')] + list(extra)


class Planted:
    """What an attacker saves as a checkpoint: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': Planted(marker), 'history': [{'epoch': 1}]}, path)


def run(*cmd, cwd=ROOT, timeout=120):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_line(stderr, *fragments):
    assert stderr.count('\n') == 1 and stderr.startswith('error: ') and 'Traceback' not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


# ------------------------------------------------------------------------------------------------
# 1. No code runs from a checkpoint
# ------------------------------------------------------------------------------------------------

def test_a_planted_checkpoint_is_never_unpickled_on_resume(run_dirs, tmp_path, capsys):
    marker = tmp_path / 'executed'
    plant(run_dirs / 'runs' / run_name(load_config(overrides=FAST)) / 'checkpoint.pt', marker)
    assert training.main(fast_args('--resume')) == 2
    one_line_error(capsys, 'cannot be resumed: it holds objects other than tensors and numbers',
                   'pass --restart to start over')
    assert not marker.exists()


@pytest.mark.slow
def test_a_sweep_trains_over_a_planted_or_cut_checkpoint_without_running_it(tmp_path):
    """A trial whose run folder holds a planted checkpoint (or one cut short): trained from epoch 0, the
    planted code never runs, and the sweep does not spin on it."""
    spec = sweep.load_sweep(write_sweep(tmp_path / 's.yaml', trials=2, epochs=1, pruning=False,
                                        space={'network_width1': {'choices': [16, 24]}}), tmp_path / 'out')
    data = sweep.load_data(spec)
    marker = tmp_path / 'executed'
    runs, _ = sweep.trial_dirs(spec)
    for width in (16, 24):
        cfg = load_config(spec['base'], {**sweep.fixed_keys(spec), 'network_width1': width})
        checkpoint = runs / run_name(cfg) / 'checkpoint.pt'
        plant(checkpoint, marker)
        if width == 24:
            checkpoint.write_bytes(checkpoint.read_bytes()[:40])   # cut short
    url = sweep.embedded_storage_url(spec)
    start = time.time()
    study = sweep.work(spec, url, spec['study'], 0, data, log=lambda *a: None)
    assert time.time() - start < 120 and not marker.exists()
    trials = study.get_trials()
    assert sorted(t.state.name for t in trials) == ['COMPLETE', 'COMPLETE']
    assert all('cannot be resumed' in t.user_attrs['restarted'] for t in trials)


# ------------------------------------------------------------------------------------------------
# 2. An output is never one of the command's inputs
# ------------------------------------------------------------------------------------------------

def test_export_onto_its_own_checkpoint_is_refused(trained, tmp_path, capsys):  # noqa: F811
    copy = tmp_path / 'm.pth'
    copy.write_bytes(trained.read_bytes())
    assert export(copy, copy) == 2
    one_line_error(capsys, f'--output {copy} is the file of --checkpoint', 'give --output another path')
    assert copy.read_bytes() == trained.read_bytes()


@pytest.mark.parametrize('option,victim', [('--test-blob', 'checkpoint'), ('--test-data', 'header'),
                                           ('--test-blob', 'header'), ('--test-data', 'checkpoint')])
def test_verification_outputs_onto_its_inputs_are_refused(trained, tmp_path, capsys, option, victim):  # noqa: F811
    checkpoint, header = tmp_path / 'm.pth', tmp_path / 'h.h'
    checkpoint.write_bytes(trained.read_bytes())
    assert export(checkpoint, header) == 0
    before = {p: p.read_bytes() for p in (checkpoint, header)}
    capsys.readouterr()
    target = checkpoint if victim == 'checkpoint' else header
    others = {'--test-data': tmp_path / 'd.h', '--test-blob': tmp_path / 'b.bin', option: target}
    assert test_inference.main(['--checkpoint', str(checkpoint), '--header', str(header),
                                *[a for k, v in others.items() for a in (k, str(v))]]) == 2
    one_line_error(capsys, f'{option} {target} is the file of --{victim}')
    assert {p: p.read_bytes() for p in (checkpoint, header)} == before


def test_the_flash_images_never_overwrite_the_blob(tmp_path):
    blob = tmp_path / 'b.bin'
    testdata.write_blob(blob, np.zeros((2, 256), np.int8), [1, 2], [1, 2], 0)
    before = blob.read_bytes()
    out = run(PY, ROOT / 'testdata.py', 'header', blob, 1, blob, '--model-header', tmp_path / 'h.h')
    assert out.returncode == 2 and blob.read_bytes() == before
    one_line(out.stderr, 'is the file of blob')


# ------------------------------------------------------------------------------------------------
# 3. The MCU build never serves a stale model
# ------------------------------------------------------------------------------------------------

def mcu_make(build, header, *goals, **variables):
    settings = {'MODEL_HEADER': header, 'BUILD': build, 'PY': PY, **variables}
    return run('make', '-C', MCU, *goals, *[f'{k}={v}' for k, v in settings.items()])


def test_the_build_copies_the_named_header_whatever_its_date(tmp_path):
    build = tmp_path / 'build'
    first, second = ROOT / 'mcu' / 'models' / 'fc_4bitsym_64x3.h', tmp_path / 'older.h'
    second.write_text((ROOT / 'mcu' / 'models' / 'fc_ternary_128x128x64.h').read_text())
    copy = build / 'BitNetMCU_model.h'
    assert mcu_make(build, first, copy).returncode == 0 and copy.read_text() == first.read_text()
    os.utime(second, (1, 1))   # exported long before the copy: make's date rule would keep the old copy
    out = mcu_make(build, second, copy)
    assert out.returncode == 0, out.stderr
    assert copy.read_text() == second.read_text()
    stamp = copy.stat().st_mtime_ns
    assert mcu_make(build, second, copy).returncode == 0 and copy.stat().st_mtime_ns == stamp   # unchanged: kept


@pytest.mark.parametrize('variables,fragment', [
    ({'MODEL_HEADER': ''}, 'MODEL_HEADER is empty'),
    ({'TEST_BLOB': ''}, 'TEST_BLOB is empty'),
    ({'FLASH_TEST_IMAGES': '0'}, 'FLASH_TEST_IMAGES=0 is not a whole number from 1'),
    ({'FLASH_TEST_IMAGES': '-1'}, 'FLASH_TEST_IMAGES=-1 is not a whole number from 1'),
])
def test_empty_or_impossible_make_variables_stop_with_one_line(tmp_path, variables, fragment):
    out = mcu_make(tmp_path / 'build', ROOT / 'mcu' / 'models' / 'fc_4bitsym_64x3.h', 'size', **variables)
    assert out.returncode == 2 and fragment in out.stderr and out.stderr.count('\n') == 1, out.stderr
    assert not (tmp_path / 'build').exists()


def test_a_file_that_is_not_a_model_header_is_named_before_the_compiler(tmp_path):
    out = mcu_make(tmp_path / 'build', ROOT / 'README.md', 'sim')
    assert out.returncode == 2 and 'is not a model header of this exportquant.py' in out.stderr
    assert out.stderr.count('error') == 1 and 'Error 2' in out.stderr   # ours, then make's own stop line


# ------------------------------------------------------------------------------------------------
# 4. Sweeps
# ------------------------------------------------------------------------------------------------

def finished_study(tmp_path, **keys):
    """A study of one quick trial (sweep file s.yaml, files in out/)."""
    spec_file = write_sweep(tmp_path / 's.yaml', trials=1, epochs=1, pruning=False,
                            space={'network_width1': {'choices': [16]}}, **keys)
    spec = sweep.load_sweep(spec_file, tmp_path / 'out')
    sweep.work(spec, sweep.embedded_storage_url(spec), 's', 0, sweep.load_data(spec), log=lambda *a: None)
    return spec_file


def sweep_main(spec_file, tmp_path, *extra):
    return sweep.main([str(spec_file), '--dir', str(tmp_path / 'out'), *extra])


@pytest.mark.slow
def test_a_changed_sweep_file_is_refused_on_its_study_and_best_configs_are_as_trained(tmp_path, capsys):
    spec_file = finished_study(tmp_path)
    assert sweep_main(spec_file, tmp_path, '--report') == 0
    best = yaml.safe_load((tmp_path / 'out' / 'best' / 'trial0.yaml').read_text())
    assert best['network_width2'] == 16 and best['network_width1'] == 16
    capsys.readouterr()
    changed = yaml.safe_load(spec_file.read_text())
    changed['set']['network_width2'] = 32
    spec_file.write_text(yaml.safe_dump(changed))
    for extra in (['--report'], []):
        assert sweep_main(spec_file, tmp_path, *extra) == 2
        one_line_error(capsys, "study 's' was run with another sweep definition (differs in config.network_width2)",
                       'give a new --study')
    other = write_sweep(tmp_path / 'other.yaml', trials=1, epochs=1, study='s')   # another file, the same study
    assert sweep_main(other, tmp_path) == 2
    one_line_error(capsys, 'another sweep definition')


@pytest.mark.parametrize('space,fragment', [
    ({'dataset': {'choices': ['MNIST', 'EMNIST_LETTERS']}}, "'dataset' is loaded once for the whole sweep"),
    ({'threads': {'choices': [1, 2]}}, "'threads' says how fast a trial trains"),
    ({'label_smoothing': {'float': [0, 0.1], 'log': True}}, 'a log range needs low > 0'),
    ({'network_width1': {'int': [8, 64], 'step': 0}}, "'space.network_width1.step': 0 must be a whole number > 0"),
    ({'network_width1': {'int': [8, 64], 'step': -8}}, 'must be a whole number > 0'),
    ({'network_width1': {'int': [8, 64], 'step': 'eight'}}, 'must be a whole number > 0'),
    ({'network_width1': {'int': [8, 64], 'step': 8, 'log': True}}, 'step and log cannot both be given'),
    ({'network_width1': {'int': [8, 64], 'log': 'yes'}}, "'space.network_width1.log': 'yes' must be true or false"),
    ({'network_width1': {'int': [8, 16], 'step': 64}}, 'is wider than the range'),
])
def test_search_spaces_optuna_would_refuse_are_named_on_load(tmp_path, space, fragment):
    with pytest.raises(sweep.SweepError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        sweep.load_sweep(write_sweep(tmp_path / 's.yaml', space=space))


@pytest.mark.parametrize('keys,fragment', [
    ({'firmware_images': 0}, "'firmware_images': 0 must be a whole number >= 1"),
    ({'train_images': 400}, "'train_images': 400 leaves no training images once the 500 validation images"),
])
def test_sweep_numbers_that_cannot_work_are_named(tmp_path, keys, fragment):
    with pytest.raises(sweep.SweepError, match=fragment):
        sweep.load_sweep(write_sweep(tmp_path / 's.yaml', **keys))


@pytest.mark.slow
def test_a_report_of_a_study_that_does_not_exist_creates_nothing(tmp_path, capsys):
    spec_file = write_sweep(tmp_path / 's.yaml')
    assert sweep_main(spec_file, tmp_path, '--report') == 2
    one_line_error(capsys, 'no study in', 'run the sweep first')
    assert not (tmp_path / 'out').exists()
    spec = sweep.load_sweep(spec_file, tmp_path / 'out')
    sweep.open_study(spec, sweep.embedded_storage_url(spec), 's')
    capsys.readouterr()
    assert sweep_main(spec_file, tmp_path, '--report', '--study', 'typo') == 2
    one_line_error(capsys, "no study 'typo'", "it holds 's'")
    assert optuna_names(tmp_path / 'out' / 'study.db') == ['s']


def optuna_names(db):
    import optuna
    return optuna.study.get_all_study_names(f'sqlite:///{db}')


def test_a_read_only_study_is_named(tmp_path, capsys):
    spec_file = write_sweep(tmp_path / 's.yaml')
    spec = sweep.load_sweep(spec_file, tmp_path / 'out')
    sweep.open_study(spec, sweep.embedded_storage_url(spec), 's')
    (tmp_path / 'out' / 'study.db').chmod(0o444)
    assert sweep_main(spec_file, tmp_path) == 2
    one_line_error(capsys, 'study.db is read-only', 'chmod u+w')


def test_a_missing_postgresql_driver_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'psycopg2', None)   # import psycopg2 fails as when it is not installed
    spec = sweep.load_sweep(write_sweep(tmp_path / 's.yaml'), tmp_path / 'out')
    with pytest.raises(sweep.SweepError, match='the PostgreSQL driver is not installed: pip install psycopg2-binary'):
        sweep.open_study(spec, 'postgresql://u:p@127.0.0.1:1/db', 's')


@pytest.mark.slow
def test_keep_0_says_so_beside_feasible_trials(tmp_path):
    spec_file = finished_study(tmp_path, keep=0)
    lines = []
    spec = sweep.load_sweep(spec_file, tmp_path / 'out')
    sweep.write_results(sweep.open_study(spec, sweep.embedded_storage_url(spec), 's'), spec, log=lines.append)
    assert not any('No feasible trial' in line for line in lines) and '0 training configs' in lines[-1]


def sweep_process(tmp_path, workers):
    spec_file = write_sweep(tmp_path / 's.yaml', trials=4, epochs=40, pruning=False)
    # SIGINT as at a terminal: a background job (CI) inherits it ignored, and Python then never raises
    # KeyboardInterrupt
    return subprocess.Popen([PY, str(ROOT / 'sweep.py'), str(spec_file), '--dir', str(tmp_path / 'out'),
                             '--workers', str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def workers_of(out_dir):
    ps = run('ps', '-ww', '-eo', 'pid,args').stdout
    return [line for line in ps.splitlines() if '--worker-id' in line and str(out_dir) in line]


def wait_for_training(tmp_path, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / 'out' / 'runs').glob('*/metrics.csv')) or list((tmp_path / 'out' / 'runs').glob('*/lock')):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_every_worker(tmp_path):
    proc = sweep_process(tmp_path, 2)
    assert wait_for_training(tmp_path, proc), proc.communicate()[1][-2000:]
    assert workers_of(tmp_path / 'out')
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'Interrupted' in err and 'Traceback' not in err, err[-2000:]
    assert not workers_of(tmp_path / 'out')


@pytest.mark.slow
def test_ctrl_c_prints_one_friendly_message_and_no_traceback(tmp_path):
    proc = sweep_process(tmp_path, 1)
    assert wait_for_training(tmp_path, proc), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'Traceback' not in err and err.strip().startswith('Interrupted'), err[-2000:]


LOST_INTERRUPT = """
import signal, sys, weakref, torch, training
training.stop_on_signals()
class Held: pass
held = Held()
ref = weakref.ref(held, lambda _: training._stop(signal.SIGINT, None))   # the signal lands in a weakref callback
del held
ref2 = weakref.ref(Held(), lambda _: 1 / 0)   # any other error there is still printed
try:
    training.train_epoch(torch.nn.Linear(256, 10), None, torch.zeros(4, 256), torch.zeros(4), {'batch_size': 2}, 'cpu')
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_an_interrupt_python_loses_in_a_callback_still_stops_training_at_the_next_batch():
    proc = subprocess.run([PY, '-c', LOST_INTERRUPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert 'KeyboardInterrupt' not in proc.stderr and 'ZeroDivisionError' in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# 5. Sizes and runs of no images
# ------------------------------------------------------------------------------------------------

def test_a_blob_of_no_images_is_refused(tmp_path):
    blob = tmp_path / 'b.bin'
    testdata.write_blob(blob, np.zeros((0, 256), np.int8), [], [], 0)
    with pytest.raises(testdata.StaleDataError, match='holds no images'):
        testdata.read_blob(blob)
    out = run(PY, MCU / 'firmware.py', 'sim', '--elf', '/bin/true', '--blob', blob)
    one_line(out.stderr, 'holds no images: run test_inference.py')
    assert out.returncode == 2


def test_a_test_header_of_no_images_is_refused(trained, tmp_path, capsys):  # noqa: F811
    assert test_inference.main(['--checkpoint', str(trained), '--test-images', '0',
                                '--test-data', str(tmp_path / 'd.h'), '--test-blob', str(tmp_path / 'b.bin')]) == 2
    one_line_error(capsys, '--test-images 0: give 1 or more')
    assert not (tmp_path / 'd.h').exists()


# ------------------------------------------------------------------------------------------------
# 6. keep_best resume
# ------------------------------------------------------------------------------------------------

def test_resuming_a_keep_best_run_whose_best_epoch_is_gone_is_refused_at_once(run_dirs, small_mnist, capsys):
    cfg = load_config(overrides={**FAST, 'num_epochs': 2, 'validation_images': 500, 'keep_best': True})
    epochs = []

    def stop_after_one(metrics):
        epochs.append(metrics)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, data=small_mnist, log=lambda *a: None, on_epoch_end=stop_after_one)
    run_dir = run_dirs / 'runs' / run_name(cfg)
    (run_dir / 'best.pt').unlink()
    with pytest.raises(training.UnresumableRun, match='best.pt is missing: the best epoch so far'):
        training.train(cfg, resume=True, data=small_mnist, log=lambda *a: None)
    assert (run_dir / 'checkpoint.pt').exists() and len(epochs) == 1   # nothing trained, nothing removed


# ------------------------------------------------------------------------------------------------
# 7. The compiled engine cache
# ------------------------------------------------------------------------------------------------

BUILD_ONE = ("import sys; from pathlib import Path; import cengine as t; t.BUILD_DIR = Path(sys.argv[1]); "
             "ffi, lib = t.build_engine(log=lambda *a: None); print('ok')")


@pytest.mark.slow
def test_engines_built_at_once_and_a_cut_cache_never_crash(tmp_path):
    for attempt in range(3):   # two processes building the same engine into an empty cache
        cache = tmp_path / f'cache{attempt}'
        procs = [subprocess.Popen([PY, '-c', BUILD_ONE, str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0] and all(out == 'ok\n' for out, _ in results), results
    (library,) = cache.glob('*.so')
    library.write_bytes(library.read_bytes()[:5000])   # a disk that filled up, a killed copy
    out = run(PY, '-c', BUILD_ONE, cache)
    assert out.returncode == 0 and out.stdout == 'ok\n', out.stderr
    assert cengine.intact(library)


# ------------------------------------------------------------------------------------------------
# 8. One line where a traceback was
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('change,fragment', [
    (lambda c: c.pop('config'), 'holds config (dict), this one has no config'),
    (lambda c: c.pop('num_classes'), 'holds num_classes (int), this one has no num_classes'),
    (lambda c: c.pop('state_dict'), 'holds state_dict (dict), this one has no state_dict'),
    (lambda c: c.update(num_classes='10'), 'this one has num_classes of type str'),
    (lambda c: c.update(config=[1]), 'this one has config of type list'),
    (lambda c: c['config'].update(network_width1=-3), 'holds an invalid config'),
])
def test_a_damaged_checkpoint_of_ours_is_named(trained, tmp_path, capsys, change, fragment):  # noqa: F811
    saved = torch.load(trained, weights_only=True)
    change(saved)
    damaged = tmp_path / 'damaged.pth'
    torch.save(saved, damaged)
    assert export(damaged, tmp_path / 'h.h') == 2
    one_line_error(capsys, 'is damaged' if 'invalid' not in fragment else 'invalid', fragment)
    assert not (tmp_path / 'h.h').exists()


def test_a_teacher_of_another_class_count_is_named_before_training(run_dirs, tmp_path, capsys):
    cfg = load_config(overrides=FAST)
    teacher = tmp_path / 'teacher5.pth'
    torch.save({'format': CHECKPOINT_FORMAT, 'config': cfg, 'num_classes': 5,
                'state_dict': build_model(cfg, 5).state_dict()}, teacher)
    assert training.main(fast_args('--set', f'teacher={teacher}')) == 2
    one_line_error(capsys, 'predicts 5 classes, MNIST has 10', 'give a teacher trained on MNIST')
    assert not (run_dirs / 'modeldata').exists()


def test_an_original_teacher_without_a_type_is_not_told_to_change_the_student(run_dirs, tmp_path, capsys):
    original = tmp_path / 'teacher.pth'
    torch.save({k: v for k, v in build_model(load_config(overrides=FAST), 10).state_dict().items()
                if k.endswith('.weight')}, original)
    assert training.main(fast_args('--set', f'teacher={original}')) == 2
    err = one_line_error(capsys, 'states no QuantType; rename it to state one (e.g. teacher_4bitsym.pth)')
    assert '--set QuantType' not in err


@pytest.mark.parametrize('blocked', ['data', 'data/MNIST/raw'])
def test_a_file_where_the_data_folder_belongs_is_named(tmp_path, blocked):
    import dataset
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text('in the way\n')
    with pytest.raises(dataset.DataError, match=f'{blocked} is a file where the data folder belongs; move it away'):
        dataset.load_dataset('MNIST', tmp_path / 'data', log=lambda *a: None)


@pytest.mark.slow
def test_a_damaged_data_cache_is_rebuilt_never_trusted(tmp_path):
    import dataset
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for source in (dataset.DATA_DIR / 'MNIST' / 'raw').iterdir():
        (raw / source.name).symlink_to(source)
    good = dataset.load_dataset('MNIST', tmp_path, log=lambda *a: None)
    cache = tmp_path / 'cache' / 'MNIST.pt'
    for damage in ('labels', 'missing key'):
        cached = torch.load(cache, weights_only=True)
        if damage == 'labels':
            cached['test_y'][:100] = (cached['test_y'][:100] + 1) % 10
        else:
            del cached['train_x16']
        torch.save(cached, cache)
        notes = []
        data = dataset.load_dataset('MNIST', tmp_path, log=notes.append)
        assert torch.equal(data['test_y'], good['test_y']) and torch.equal(data['train_x16'], good['train_x16'])
        assert any('is damaged or out of date; it is rebuilt' in note for note in notes)


@pytest.mark.parametrize('setting,fragment', [
    ('runtag=[x', "--set 'runtag=[x': the value is not valid YAML"),
    ('runtag={a', 'quote text'),
    ('network_width1=100000', "'network_width1': 100000 must be between 1 and 4096"),
    ('cnn_width=100000', "'cnn_width': 100000 must be between 1 and 4096"),
    ('runtag=123', "'runtag': 123 is an int, expected str (to give it as text, quote it: --set runtag='123'"),
    ('threads=0', "'threads': 0 must be a whole number from 1 to 256 or 'auto'"),
])
def test_unparsable_or_huge_settings_are_one_line(run_dirs, capsys, setting, fragment):
    assert training.main(['--set', setting]) == 2
    one_line_error(capsys, fragment)


@pytest.mark.parametrize('command', [
    [PY, ROOT / 'training.py', '--params', '/dev/zero'],
    [PY, ROOT / 'sweep.py', '/dev/zero'],
    [PY, ROOT / 'testdata.py', 'check', ROOT / 'mcu' / 'models' / 'fc_4bitsym_64x3.h', '/dev/zero'],
    [PY, ROOT / 'testdata.py', 'check', '/dev/zero', '/dev/zero'],
])
@pytest.mark.slow
def test_devices_are_not_read_without_end(command):
    out = run(*command, timeout=60)
    assert out.returncode == 2
    one_line(out.stderr, '/dev/zero is not a regular file')


@pytest.mark.slow
def test_a_huge_config_file_is_refused_unread(tmp_path):
    big = tmp_path / 'big.yaml'
    big.write_text('# padding\n' * 200_000)
    out = run(PY, ROOT / 'training.py', '--params', big)
    assert out.returncode == 2
    one_line(out.stderr, 'is larger than 1,048,576 bytes')


@pytest.mark.slow
def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    bomb = tmp_path / 'bomb.yaml'
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]")
    bomb.write_text('\n'.join(lines + ['runtag: *i']) + '\n')
    assert bomb.stat().st_size < 1024
    out = run(PY, ROOT / 'training.py', '--params', bomb)
    assert out.returncode == 2 and len(out.stderr) < 300
    one_line(out.stderr, 'uses the YAML alias *a; config files take no aliases')


@pytest.mark.parametrize('kind', ['directory', 'latin-1'])
def test_a_header_that_is_a_folder_or_not_text_is_named(trained, tmp_path, capsys, kind):  # noqa: F811
    header = tmp_path / 'h.h'
    if kind == 'directory':
        header.mkdir()
    else:
        header.write_bytes('/* caf\xe9 */\n'.encode('latin-1'))
    assert test_inference.main(['--checkpoint', str(trained), '--header', str(header), '--test-data',
                                str(tmp_path / 'd.h'), '--test-blob', str(tmp_path / 'b.bin')]) == 2
    one_line_error(capsys, 'is a directory' if kind == 'directory' else 'not UTF-8 text')


def test_plots_onto_a_file_are_refused_before_the_header_is_written(trained, tmp_path, capsys):  # noqa: F811
    plots = tmp_path / 'plots'
    plots.write_text('a file\n')
    assert export(trained, tmp_path / 'h.h', '--plots', str(plots)) == 2
    one_line_error(capsys, f'--plots {plots} is a file; give a folder')
    assert not (tmp_path / 'h.h').exists() and plots.read_text() == 'a file\n'


def elf_cases(tmp_path):
    text, empty, riscv64 = tmp_path / 'notes.txt', tmp_path / 'empty.elf', tmp_path / 'rv64.elf'
    text.write_text('not a program\n')
    empty.write_bytes(b'')
    riscv64.write_bytes(b'\x7fELF\x02\x01\x01' + bytes(11) + (243).to_bytes(2, 'little') + bytes(44))
    return {'text': (text, 'no ELF magic'), 'directory': (tmp_path, 'is a directory'),
            'empty': (empty, 'not an ELF file (empty)'), 'x86': (Path('/bin/true'), 'not a 32-bit RISC-V one'),
            'rv64': (riscv64, 'not a 32-bit RISC-V one')}


@pytest.mark.parametrize('case', ['text', 'directory', 'empty', 'x86', 'rv64'])
def test_chipsim_refuses_what_is_not_a_riscv32_elf(tmp_path, case):
    path, fragment = elf_cases(tmp_path)[case]
    out = run(PY, MCU / 'chipsim.py', '--elf', path)
    assert out.returncode == 2
    one_line(out.stderr, fragment)


def test_firmware_sim_refuses_a_foreign_elf_at_once(trained, tmp_path, small_mnist, monkeypatch):  # noqa: F811
    from test_bad_inputs import header_and_data
    header, _, blob = header_and_data(trained, tmp_path, small_mnist, monkeypatch)
    start = time.time()
    out = run(PY, MCU / 'firmware.py', 'sim', '--elf', '/bin/true', '--blob', blob, '--header', header)
    assert out.returncode == 2 and time.time() - start < 30
    one_line(out.stderr, 'is an ELF for machine 62 (64-bit), not a 32-bit RISC-V one')


@pytest.mark.parametrize('command,fragment', [
    (['sim', '--elf', 'x.elf'], 'firmware.py sim needs --blob'),
    (['size', '--elf', 'x.elf'], 'firmware.py size needs --sim-elf and --blob'),
    (['nomul'], 'firmware.py nomul needs --elf'),
])
def test_firmware_commands_name_the_options_they_miss(command, fragment):
    out = run(PY, MCU / 'firmware.py', *command)
    assert out.returncode == 2
    one_line(out.stderr, fragment)


def test_a_blob_too_big_for_the_emulator_is_named(tmp_path):
    blob = tmp_path / 'big.bin'
    count = 1_000_000   # 258 MB of images
    with open(blob, 'wb') as f:
        f.write(b'BNMT' + np.array([testdata.BLOB_VERSION, count, 256, 0], '<u4').tobytes())
        f.truncate(testdata.BLOB_HEADER_BYTES + count * 258)
    elf = tmp_path / 'rv32.elf'
    elf.write_bytes(b'\x7fELF\x01\x01\x01' + bytes(11) + (243).to_bytes(2, 'little') + bytes(32))
    out = run(PY, MCU / 'firmware.py', 'sim', '--elf', elf, '--blob', blob)
    assert out.returncode == 2
    one_line(out.stderr, "holds 258,000,020 bytes; the emulator's RAM has room for", 'write a blob of fewer images')


# ------------------------------------------------------------------------------------------------
# 9. Messages that say what to do
# ------------------------------------------------------------------------------------------------

def test_params_beside_a_checkpoint_of_ours_is_refused_not_ignored(trained, tmp_path, capsys):  # noqa: F811
    params = tmp_path / 'p.yaml'
    params.write_text('QuantType: 2bitsym\n')
    assert export(trained, tmp_path / 'h.h', '--params', str(params)) == 2
    one_line_error(capsys, 'carries the config it was trained with', 'leave it out')


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------

def test_threads_are_a_setting_of_the_run_not_of_the_model(run_dirs, small_mnist, monkeypatch):
    cfg = load_config(overrides=FAST)
    assert run_name(cfg) == run_name({**cfg, 'threads': 2}) == run_name({**cfg, 'threads': 'auto'})
    assert training.thread_count(cfg) == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert training.thread_count({**cfg, 'threads': 'auto'}) == 3 and training.thread_count({**cfg, 'threads': 2}) == 2
    lines = []
    training.train({**cfg, 'threads': 2}, data=small_mnist, log=lines.append)
    assert 'device cpu, 2 threads' in lines[0] and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert validate_config({'threads': 'auto'})['threads'] == 'auto'
