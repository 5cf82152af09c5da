"""Bad inputs and faults, as a new user meets them: every case gets a one-line error that names the problem
and the fix (no traceback), the exit status says so, and nothing the user had is lost or replaced."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cengine
import chips
import exportquant
import modelheader
import pipeline
import test_inference
import training
from checkpoint import load_checkpoint
from config import load_config
from conftest import ROOT
from fileio import atomic_write
from intmodel import ExportError, to_int_model
from testdata import header_fingerprint

FAST = dict(model='FCMNIST', num_epochs=1, augmentation=False, network_width1=32, network_width2=24,
            network_width3=16, batch_size=64, learning_rate=0.003, runtag='bad')


@pytest.fixture(scope='module')
def trained(small_mnist, tmp_path_factory):
    """One small trained checkpoint, shared by the tests that need a model."""
    folder = tmp_path_factory.mktemp('trained')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, 'MODEL_DIR', folder / 'modeldata')
        mp.setattr(training, 'RUNS_DIR', folder / 'runs')
        return training.train(load_config(overrides=FAST), data=small_mnist, log=lambda *a: None)


def export(checkpoint, output, *extra):
    return exportquant.main(['--checkpoint', str(checkpoint), '--output', str(output), '--no-eval', *extra])


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------------------------------------
# 1. Outputs never replace what is at their path
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path('/dev/full').is_char_device(), reason='needs /dev/full')
@pytest.mark.slow
def test_output_to_a_device_is_written_plainly_never_replaced(trained, capsys):
    assert export(trained, '/dev/full') == 2
    one_line_error(capsys, 'cannot write /dev/full: No space left on device')
    assert Path('/dev/full').is_char_device()
    assert export(trained, '/dev/null') == 0 and Path('/dev/null').is_char_device()


def test_output_through_a_symlink_updates_its_target_and_keeps_the_link(trained, tmp_path):
    target, link = tmp_path / 'models' / 'real.h', tmp_path / 'link.h'
    target.parent.mkdir()
    target.write_text('old\n')
    link.symlink_to(target)
    assert export(trained, link) == 0
    assert link.is_symlink() and link.resolve() == target
    assert 'BitNetMCU_model_infer' in target.read_text()


def test_read_only_output_is_refused_and_kept(trained, tmp_path, capsys):
    header = tmp_path / 'model.h'
    header.write_text('keep me\n')
    header.chmod(0o444)
    assert export(trained, header) == 2
    one_line_error(capsys, 'is read-only (mode 0444)', 'chmod u+w')
    assert header.read_text() == 'keep me\n' and stat.S_IMODE(header.stat().st_mode) == 0o444


def test_outputs_take_their_mode_from_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / 'new.h', 'x')
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / 'new.h').stat().st_mode) == 0o640
    kept = tmp_path / 'kept.h'
    kept.write_text('y')
    kept.chmod(0o604)
    atomic_write(kept, 'z')
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() == 'z'


def test_temp_files_of_a_killed_write_are_cleaned_up(tmp_path):
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()                                           # a pid that no longer runs
    stale = tmp_path / f'.model.h.{gone.pid}.abcd.tmp'
    stale.write_text('half a header')
    mine = tmp_path / f'.model.h.{os.getpid()}.live.tmp'  # a write in progress (this process): kept
    mine.write_text('in progress')
    atomic_write(tmp_path / 'model.h', 'whole')
    assert not stale.exists() and mine.exists() and (tmp_path / 'model.h').read_text() == 'whole'


def test_output_onto_a_directory_or_into_a_read_only_one_is_refused(trained, tmp_path, capsys):
    assert export(trained, tmp_path) == 2
    one_line_error(capsys, 'is a directory; give the path of a file')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    assert export(trained, locked / 'model.h') == 2
    one_line_error(capsys, f'the folder {locked} is read-only')
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# 2, 3. Training: diverging runs stop at once; configs export would refuse are refused on load
# ------------------------------------------------------------------------------------------------

def fast_args(**extra):
    args = []
    for key, value in {**FAST, **extra}.items():
        args += ['--set', f'{key}={value}']
    return args


@pytest.mark.parametrize('value,fragment', [('.inf', 'inf must be a finite number'),
                                            ('1.0e+30', '1e+30 must be > 0 and at most 1')])
def test_learning_rates_that_can_only_diverge_are_refused_on_load(run_dirs, capsys, value, fragment):
    assert training.main(fast_args(learning_rate=value)) == 2
    one_line_error(capsys, f"config key 'learning_rate': {fragment}")
    assert not (run_dirs / 'runs').exists()


def test_a_non_finite_loss_stops_training_at_once_and_saves_no_model(run_dirs, capsys, monkeypatch):
    real, calls = training.loss_fn, []

    def diverging(*args, **kwargs):   # what a run whose weights blew up sees: from the 3rd batch on, NaN
        calls.append(1)
        return real(*args, **kwargs) * (float('nan') if len(calls) >= 3 else 1.0)
    monkeypatch.setattr(training, 'loss_fn', diverging)
    assert training.main(fast_args()) == 1
    one_line_error(capsys, 'training diverged: the loss is nan at batch 3 of epoch 1 (learning rate',
                   'a smaller learning_rate usually cures it', 'nothing was saved; no model was written')
    assert len(calls) == 3                                        # at once, not after an epoch of NaN
    assert not (run_dirs / 'modeldata').exists() or not list((run_dirs / 'modeldata').iterdir())
    assert not list((run_dirs / 'runs').glob('*/checkpoint.pt'))


@pytest.mark.parametrize('key,value,fragment', [
    ('NormType', 'BatchNorm', "'NormType': 'BatchNorm' subtracts a mean"),
    ('WScale', 'PerOutput', "'WScale': 'PerOutput' gives every row its own scale"),
    ('QuantType', 'None', "'QuantType': 'None' has no integer form")])
def test_configs_export_would_refuse_stop_before_training(run_dirs, capsys, key, value, fragment):
    assert training.main(fast_args(**{key: value})) == 2
    one_line_error(capsys, fragment, 'set exportable: false')
    assert not (run_dirs / 'runs').exists()


# ------------------------------------------------------------------------------------------------
# 4. Test data belongs to one model header
# ------------------------------------------------------------------------------------------------

def header_and_data(trained, tmp_path, small_mnist, monkeypatch):
    header, data, blob = tmp_path / 'model.h', tmp_path / 'data.h', tmp_path / 'data.bin'
    assert export(trained, header) == 0
    monkeypatch.setattr(test_inference, 'load_dataset', lambda name: small_mnist)
    assert test_inference.main(['--checkpoint', str(trained), '--header', str(header), '--test-data', str(data),
                                '--test-blob', str(blob), '--test-images', '20']) == 0
    return header, data, blob


@pytest.mark.slow
def test_test_data_of_another_header_is_refused(trained, tmp_path, small_mnist, monkeypatch, capsys):
    header, data, blob = header_and_data(trained, tmp_path, small_mnist, monkeypatch)
    capsys.readouterr()
    other = tmp_path / 'other.h'     # another export (other layout): a valid header the data was not made for
    assert export(trained, other, '--layout', 'output-major') == 0
    capsys.readouterr()
    for made_for in (data, blob):
        check = subprocess.run([sys.executable, str(ROOT / 'testdata.py'), 'check', str(other), str(made_for)],
                               capture_output=True, text=True)
        assert check.returncode == 2 and 'was made for another model header' in check.stderr
        assert 'run test_inference.py' in check.stderr
        check = subprocess.run([sys.executable, str(ROOT / 'testdata.py'), 'check', str(header), str(made_for)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    # The C program refuses at compile time too (make ctest, the chip build).
    (tmp_path / 'BitNetMCU_model.h').write_text(other.read_text())
    (tmp_path / 'BitNetMCU_MNIST_test_data.h').write_text(data.read_text())
    (tmp_path / 'BitNetMCU_MNIST_test.c').write_text((ROOT / 'BitNetMCU_MNIST_test.c').read_text())
    build = subprocess.run(['cc', '-std=c99', f'-I{ROOT}', str(tmp_path / 'BitNetMCU_MNIST_test.c'),
                            str(ROOT / 'BitNetMCU_inference.c'), '-o', str(tmp_path / 'a.out')],
                           capture_output=True, text=True)
    assert build.returncode != 0 and 'made for another model header: run test_inference.py' in build.stderr


def test_a_header_of_another_engine_format_stops_the_build(trained, tmp_path, small_mnist, monkeypatch):
    """A kernel that reads its weights differently would compute wrong outputs from an older header without
    a word: the header names its format, and the build stops on any other, or on a header that names none."""
    header, data, _ = header_and_data(trained, tmp_path, small_mnist, monkeypatch)
    (tmp_path / 'BitNetMCU_MNIST_test_data.h').write_text(data.read_text())
    host_test = tmp_path / 'BitNetMCU_MNIST_test.c'
    host_test.write_text((ROOT / 'BitNetMCU_MNIST_test.c').read_text())
    engine = (ROOT / 'BitNetMCU_inference.h').read_text()

    def build(header_text, engine_text=engine):
        """The compiler's messages for both programs that include a model header (host test, firmware)."""
        (tmp_path / 'BitNetMCU_model.h').write_text(header_text)
        (tmp_path / 'BitNetMCU_inference.h').write_text(engine_text)   # found before ROOT's
        return [subprocess.run(['cc', '-std=c99', '-fsyntax-only', f'-I{tmp_path}', f'-I{ROOT / "mcu"}', f'-I{ROOT}',
                                str(program)], capture_output=True, text=True)
                for program in (host_test, ROOT / 'mcu' / 'BitNetMCUdemo.c')]

    text = header.read_text()
    assert all(result.returncode == 0 for result in build(text))
    other_engine = engine.replace(f'#define BITNETMCU_ENGINE_FORMAT {modelheader.HEADER_FORMAT}\n',
                                  f'#define BITNETMCU_ENGINE_FORMAT {modelheader.HEADER_FORMAT + 1}\n')
    assert other_engine != engine
    for result in build(text, other_engine):
        assert result.returncode != 0 and 'BitNetMCU_inference.h reads another: export the model again' in result.stderr
    older = re.sub(r'#define BITNETMCU_MODEL_FORMAT \d+\n#if .*?#endif\n', '', text, flags=re.S)
    assert 'BITNETMCU_MODEL_FORMAT' not in older
    for result in build(older):
        assert result.returncode != 0 and 'names no format: it predates this engine' in result.stderr


def test_an_edited_header_is_caught(trained, tmp_path, small_mnist, monkeypatch):
    header, data, _ = header_and_data(trained, tmp_path, small_mnist, monkeypatch)
    text = header.read_text()
    digit = text.index('0x', text.index('BitNetMCU_layer1_weights')) + 5
    header.write_text(text[:digit] + ('7' if text[digit] != '7' else '8') + text[digit + 1:])
    check = subprocess.run([sys.executable, str(ROOT / 'testdata.py'), 'check', str(header), str(data)],
                           capture_output=True, text=True)
    assert check.returncode == 2 and 'was edited after export' in check.stderr and 'export it again' in check.stderr


def test_truncated_or_foreign_blob_is_named_before_the_emulator_runs(trained, tmp_path, small_mnist, monkeypatch):
    header, _, blob = header_and_data(trained, tmp_path, small_mnist, monkeypatch)
    whole = blob.read_bytes()
    for damaged, message in [(whole[:-100], 'cut short'), (b'PK' + whole[2:], 'is not a BitNetMCU test-data blob'),
                             (whole[:4] + b'\x01' + whole[5:], 'has format version 1, this code reads 2')]:
        blob.write_bytes(damaged)
        run = subprocess.run([sys.executable, str(ROOT / 'mcu' / 'firmware.py'), 'sim', '--elf', 'unused.elf',
                              '--blob', str(blob), '--header', str(header)], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and 'run test_inference.py' in run.stderr, run.stderr


# ------------------------------------------------------------------------------------------------
# 5. Export checks the integer model before it writes anything
# ------------------------------------------------------------------------------------------------

def broken_copy(trained, tmp_path, change):
    saved = torch.load(trained, weights_only=False)
    change(saved['state_dict'])
    path = tmp_path / 'broken.pth'
    torch.save(saved, path)
    return path


@pytest.mark.parametrize('change,fragment', [
    (lambda sd: sd['layers.2.s'].zero_(), 'layers.2: its clipping scalar s = [0.0] is not a positive finite number'),
    (lambda sd: sd['layers.4.weight'].view(-1)[:3].fill_(float('inf')), 'layers.4: 3 weights are not finite')])
def test_broken_weights_or_scales_name_the_layer_and_write_nothing(trained, tmp_path, capsys, change, fragment):
    header = tmp_path / 'model.h'
    header.write_text('previous header\n')
    assert export(broken_copy(trained, tmp_path, change), header) == 2
    one_line_error(capsys, fragment)
    assert header.read_text() == 'previous header\n'


def test_float_integer_disagreement_refuses_unless_forced(trained, tmp_path, capsys, monkeypatch, small_mnist):
    # An integer path that has gone wrong: its predictions no longer follow the trained model's.
    real = pipeline.reference_logits
    monkeypatch.setattr(pipeline, 'reference_logits', lambda m, x: np.roll(real(m, x), 1, axis=1))
    monkeypatch.setattr(exportquant, 'load_dataset', lambda name: small_mnist)
    header = tmp_path / 'model.h'
    header.write_text('previous header\n')
    args = ['--checkpoint', str(trained), '--output', str(header)]
    assert exportquant.main(args) == 2
    one_line_error(capsys, 'the float and the integer model disagree on', 'nothing was written', '--force')
    assert header.read_text() == 'previous header\n'
    assert exportquant.main(args + ['--force']) == 0 and 'BitNetMCU_model_infer' in header.read_text()


# ------------------------------------------------------------------------------------------------
# 6, 7. Original checkpoints: the original's rule per type; type and widths from the file name
# ------------------------------------------------------------------------------------------------

def as_original(trained, tmp_path, name, with_s=False):
    """Our weights in the original BitNetMCU's v0.2a layout (fc1, fc2, fc3, fcl; no `s` unless with_s)."""
    state = torch.load(trained, weights_only=False)['state_dict']
    out = {}
    for ours, theirs in zip(['layers.0', 'layers.2', 'layers.4', 'layers.6'], ['fc1', 'fc2', 'fc3', 'fcl']):
        out[f'{theirs}.weight'] = state[f'{ours}.weight']
        if with_s:
            out[f'{theirs}.s'] = state[f'{ours}.weight'].abs().max().reshape(1)
    path = tmp_path / name
    torch.save(out, path)
    return path, out


def original_codes(w, qtype, quantscale, s=None):
    """The integers the original BitNetMCU's own C engine multiplies by, by its documented per-type rules
    (v0.2a: mag = mean|W| per tensor; with `s`, s takes the place of mag / quantscale)."""
    w = w.double()
    x = w / (w.abs().mean() if s is None else s * quantscale)   # W / mag, or W / (s * qs)
    if qtype == '2bitsym':       # no quantscale: clip(round(W / mag - 0.5), -2, 1) + 0.5, as odd integers
        x = w / (w.abs().mean() if s is None else s / 2)
        return 2 * ((x - 0.5).round().clamp(-2, 1) + 0.5)
    if qtype == '4bitsym':
        return 2 * ((x * 8 * quantscale - 0.5).round().clamp(-8, 7) + 0.5)
    if qtype == '4bit':
        return (x * 8 * quantscale).round().clamp(-8, 7)
    if qtype == '8bit':
        return (x * 128 * quantscale).round().clamp(-128, 127)
    if qtype == 'FP130':         # truncation: e = clip(floor(log2(|W| * 128 * qs / mag)), 0, 7)
        e = torch.log2(x.abs() * 128 * quantscale).floor().clamp(0, 7)
        return torch.where(w >= 0, 1.0, -1.0).double() * 2 ** e
    raise ValueError(qtype)


@pytest.mark.parametrize('qtype,quantscale', [('2bitsym', 0.25), ('FP130', 0.125), ('4bitsym', 0.25),
                                              ('4bit', 0.25), ('8bit', 0.25)])
def test_original_v02a_checkpoints_import_with_the_originals_rule_per_type(trained, tmp_path, qtype, quantscale):
    path, state = as_original(trained, tmp_path, f'Opt_FCMNIST_BitMnist_{qtype}_width32_24_16_epochs10.pth')
    model, cfg, _ = load_checkpoint(path, overrides={'maxw_quantscale': quantscale})
    assert cfg['QuantType'] == qtype                           # from the file name
    for op, key in zip(to_int_model(model).weight_ops(), ['fc1', 'fc2', 'fc3', 'fcl']):
        assert np.array_equal(op.weights, original_codes(state[f'{key}.weight'], qtype, quantscale).numpy()), key


@pytest.mark.parametrize('qtype', ['FP130', '4bitsym'])
def test_original_checkpoints_with_s_import_with_the_originals_rule(trained, tmp_path, qtype):
    path, state = as_original(trained, tmp_path, f'run_{qtype}_s.pth', with_s=True)
    model, _, _ = load_checkpoint(path)
    for op, key in zip(to_int_model(model).weight_ops(), ['fc1', 'fc2', 'fc3', 'fcl']):
        expected = original_codes(state[f'{key}.weight'], qtype, 1.0, state[f'{key}.s'])
        assert np.array_equal(op.weights, expected.numpy()), key


def test_original_type_comes_from_the_file_name_or_is_asked_for(trained, tmp_path, capsys):
    header = tmp_path / 'model.h'
    named, _ = as_original(trained, tmp_path, 'Opt_FCMNIST_Aug_BitMnist_Binary_width32_24_16_epochs60.pth')
    assert export(named, header) == 0                          # exports as Binary, no --set needed
    assert 'Binary, for BitNetMCU_fc_Binary()' in header.read_text()
    header.write_text('previous header\n')
    assert export(named, header, '--set', 'QuantType=4bitsym') == 2
    one_line_error(capsys, "names QuantType 'Binary'; --set says '4bitsym'")
    unnamed, _ = as_original(trained, tmp_path, 'my_model.pth')
    assert export(unnamed, header) == 2
    one_line_error(capsys, 'does not record its QuantType', 'pass --set QuantType=<Binary|Ternary')
    wrong, _ = as_original(trained, tmp_path, 'Opt_FCMNIST_BitMnist_Binary_width160_160_160_epochs60.pth')
    assert export(wrong, header) == 2
    one_line_error(capsys, 'holds network_width1=32', 'its file name says network_width1=160')
    assert header.read_text() == 'previous header\n'


def test_class_count_is_checked_against_the_dataset(trained, tmp_path, capsys, monkeypatch, small_mnist):
    state = torch.load(trained, weights_only=False)['state_dict']
    letters = {'fc1.weight': state['layers.0.weight'], 'fc2.weight': state['layers.2.weight'],
               'fc3.weight': state['layers.4.weight'], 'fcl.weight': torch.randn(27, 16)}   # a 27-class model
    path = tmp_path / 'letters_4bitsym.pth'
    torch.save(letters, path)
    monkeypatch.setattr(exportquant, 'load_dataset', lambda name: small_mnist)
    assert exportquant.main(['--checkpoint', str(path), '--output', str(tmp_path / 'model.h')]) == 2
    one_line_error(capsys, 'the model has 27 outputs, MNIST has 10 classes', '--set dataset=')
    assert not (tmp_path / 'model.h').exists()


# ------------------------------------------------------------------------------------------------
# 8. Everything else a user can get wrong
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('content,fragment', [
    (None, 'is a directory; give a YAML file'),
    (bytes(range(256)), 'is not UTF-8 text (byte 0x80 at offset 128); save it as UTF-8'),
    ('runtag: caf\xe9\n'.encode('latin-1'), 'is not UTF-8 text (byte 0xe9 at offset 11)'),
    (b'seed: 1\nseed: 2\n', "key 'seed' is given twice (again on line 2)")])
def test_unreadable_params_files(tmp_path, capsys, content, fragment):
    params = tmp_path / 'params.yaml'
    if content is None:
        params.mkdir()
    else:
        params.write_bytes(content)
    assert training.main(['--params', str(params)]) == 2
    one_line_error(capsys, fragment)


def test_yaml_1_1_exponents_are_numbers(tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text('learning_rate: 1e-3\nmaxw_quantscale: 2.5E-1\n')
    cfg = load_config(params)
    assert cfg['learning_rate'] == 0.001 and cfg['maxw_quantscale'] == 0.25


@pytest.mark.parametrize('setting,fragment', [
    ('seed=9223372036854775808', "'seed': 9223372036854775808 must be between 0 and 4294967295"),
    ('runtag=../../etc', "'runtag': '../../etc' must be 1 to 64 letters"),
    ('runtag=a/b', "'runtag': 'a/b' must be 1 to 64 letters"),
    ('runtag=' + 'x' * 300, "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' (300 characters) must be 1 to 64 letters")])
def test_seed_and_runtag_bounds(run_dirs, capsys, setting, fragment):
    assert training.main(['--set', setting]) == 2
    one_line_error(capsys, fragment)
    assert not (run_dirs / 'runs').exists()


def test_keys_of_the_other_model_are_named(run_dirs, capsys):
    assert training.main(['--set', 'model=FCMNIST', '--set', 'cnn_width=48', '--set', 'conv_QuantType=4bit',
                          '--resume']) == 2
    assert "note: cnn_width=48, conv_QuantType='4bit' only affect CNNMNIST or DenseCNN models; FCMNIST ignores " \
           "them" in capsys.readouterr().out
    assert training.main(['--set', 'window_stride=2', '--set', 'cnn_width=8', '--resume']) == 2   # the default model
    assert "note: cnn_width=8 only affects CNNMNIST or DenseCNN models; WindowFCMNIST ignores it" in \
        capsys.readouterr().out


@pytest.mark.skipif(sys.platform == 'win32', reason='the lock is POSIX-only')
def test_two_trainings_of_one_run_cannot_race(run_dirs, capsys):
    import fcntl
    from config import run_name
    run_dir = run_dirs / 'runs' / run_name(load_config(overrides=FAST))
    run_dir.mkdir(parents=True)
    with open(run_dir / 'lock', 'w') as held:              # the other training
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert training.main(fast_args()) == 2
    one_line_error(capsys, 'another process is training this config now')
    assert not (run_dir / 'checkpoint.pt').exists()


def test_random_bytes_and_newer_checkpoints(tmp_path, capsys):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert export(junk, tmp_path / 'model.h') == 2
    err = one_line_error(capsys, 'is not a PyTorch checkpoint, or it was cut short')
    assert 'weights_only' not in err                             # no advice to load unsafely
    newer = tmp_path / 'newer.pth'
    torch.save({'format': 'BitNetMCU-checkpoint-v9', 'config': {}, 'state_dict': {}}, newer)
    assert export(newer, tmp_path / 'model.h') == 2
    one_line_error(capsys, 'is a BitNetMCU-checkpoint-v9 file, this BitNetMCU reads BitNetMCU-checkpoint-v1')


def test_missing_c_compiler_is_named(trained, tmp_path, capsys, monkeypatch, small_mnist):
    header = tmp_path / 'model.h'
    assert export(trained, header) == 0
    header.write_text(header.read_text() + '/* not built before: no cached engine */\n')
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
    with pytest.raises(ExportError, match="no C compiler '.*no-such-cc': install gcc"):
        cengine.build_engine(header, log=lambda *a: None)


@pytest.mark.slow
def test_read_only_data_folder_without_cache_still_loads(tmp_path):
    import dataset
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for source in (dataset.DATA_DIR / 'MNIST' / 'raw').iterdir():
        shutil.copy(source, raw / source.name)
    for folder in (raw, raw.parent, tmp_path):
        folder.chmod(0o555)
    notes = []
    try:
        data = dataset.load_dataset('MNIST', tmp_path, log=notes.append)
    finally:
        for folder in (tmp_path, raw.parent, raw):
            folder.chmod(0o755)
    assert data['test_x16'].shape == (10000, 16, 16)
    assert any('not cached' in note and 'is read-only' in note for note in notes)


@pytest.mark.slow
def test_firmware_of_a_model_that_does_not_fit_says_by_how_much(small_mnist, mnist, run_dirs, tmp_path):
    path = training.train(load_config(overrides={**FAST, 'QuantType': '8bit', 'network_width1': 64,
                                                 'network_width2': 64, 'network_width3': 64}),
                          data=small_mnist, log=lambda *a: None)
    pipeline.measure_model(path, tmp_path, mnist, targets=(), images=50)
    run = chips.make('CH32V003', tmp_path / 'model.h', tmp_path / 'test.bin', tmp_path / 'build', 'sim', 'size')
    assert 'note: this model does not fit the CH32V003: flash' in run.stdout
    assert run.returncode != 0 and 'DOES NOT FIT: flash' in run.stdout and 'bytes over its 16384' in run.stdout
    blob = bytearray((tmp_path / 'test.bin').read_bytes())
    blob[16:20] = (header_fingerprint(tmp_path / 'model.h') ^ 1).to_bytes(4, 'little')   # made for another header
    (tmp_path / 'test.bin').write_bytes(bytes(blob))
    run = chips.make('CH32V003', tmp_path / 'model.h', tmp_path / 'test.bin', tmp_path / 'build', 'sim')
    assert run.returncode != 0 and 'was made for another model header' in run.stderr
