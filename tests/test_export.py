"""Export and verification: every exportable type, FC and CNN, through header, C compilers and cffi,
with 0 mismatches against the Python reference on all 10,000 test images; original checkpoints."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import exportquant
import pipeline
import test_inference
import training
from BitNetMCU import EXPORTABLE_TYPES, LAYOUTS, QUANT_TYPES
from checkpoint import load_checkpoint
from config import ConfigError, load_config
from conftest import ROOT, original_checkpoint
from dataset import normalize
from intmodel import ExportError, encode_input, pack_model, reference_logits, to_int_model
from testdata import data_header_text, fingerprint_line, header_fingerprint, read_blob

STRICT = ['-std=c99', '-Wall', '-Wextra', '-Wpedantic', '-Werror', '-O1']


def short_training(data, run_dirs, **overrides):
    cfg = load_config(overrides={**dict(model='FCMNIST', num_epochs=1, augmentation=False, batch_size=64, network_width1=32,
                                        network_width2=24, network_width3=16, learning_rate=0.003, runtag='t'),
                                 **overrides})
    return training.train(cfg, data=data, log=lambda *a: None)


def compile_host_program(tmp_path, header, images, labels, predictions, compiler):
    (tmp_path / 'BitNetMCU_model.h').write_text(Path(header).read_text())
    (tmp_path / 'BitNetMCU_MNIST_test_data.h').write_text(
        data_header_text(images, labels, predictions, header_fingerprint(header)))
    # The program sits beside the headers: a quoted #include looks in the including file's folder first.
    (tmp_path / 'BitNetMCU_MNIST_test.c').write_text((ROOT / 'BitNetMCU_MNIST_test.c').read_text())
    exe = tmp_path / f'test_{compiler}'
    build = subprocess.run([compiler, *STRICT, f'-I{ROOT}', str(tmp_path / 'BitNetMCU_MNIST_test.c'),
                            str(ROOT / 'BitNetMCU_inference.c'), '-o', str(exe)], capture_output=True, text=True)
    assert build.returncode == 0 and not build.stderr, build.stderr     # compiles, and without a warning
    return subprocess.run([str(exe)], capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize('model', ['FCMNIST', 'CNNMNIST'])
@pytest.mark.parametrize('qtype', EXPORTABLE_TYPES)
def test_every_type_exports_compiles_and_matches_on_10000_images(small_mnist, mnist, run_dirs, tmp_path, model, qtype):
    # CNN: the convolutions take the type too where it has an int8 conv kernel (FP130's 2^7 does not).
    conv_type = qtype if QUANT_TYPES[qtype].int32_conv else '8bit'
    extra = dict(model='CNNMNIST', cnn_width=6, network_width3=0, conv_QuantType=conv_type) \
        if model == 'CNNMNIST' else {}
    path = short_training(small_mnist, run_dirs, QuantType=qtype, fc1_QuantType=qtype, **extra)
    header = tmp_path / 'model.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval']) == 0
    net, _, _ = load_checkpoint(path)
    int_model = to_int_model(net)
    result = pipeline.verify(net, int_model, header, mnist, log=lambda *a: None)
    assert result['n'] == 10000 and result['mismatches'] == 0
    assert result['c_acc'] == result['python_acc'] > 0.2            # learned something (chance: 0.1)
    # The integer model is the trained model: only rounding in the activations may move a few images.
    float_pred = net.eval()(normalize(mnist['test_x16'])).argmax(1).numpy()
    assert (float_pred != result['predictions']).mean() < 0.03
    for compiler in ('gcc', 'clang'):
        run = compile_host_program(tmp_path, header, result['images'][:200], result['labels'][:200],
                                   result['predictions'][:200], compiler)
        assert run.returncode == 0 and '200 images' in run.stdout and '0 mismatches' in run.stdout, run.stdout


@pytest.mark.slow
@pytest.mark.parametrize('conv_type', ['FP130', '4bitsym', '2bitsym', 'Ternary', '8bit'])
def test_int8_activation_cnn_exports_and_matches_on_10000_images(small_mnist, mnist, run_dirs, tmp_path, conv_type):
    """conv_activations int8: the trained convolutions compute exactly what the C kernels compute."""
    path = short_training(small_mnist, run_dirs, model='CNNMNIST', cnn_width=6, network_width3=0,
                          conv_activations='int8', conv_QuantType=conv_type)
    header = tmp_path / 'model.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval']) == 0
    assert f'BitNetMCU_qconv3x3_{conv_type}(' in header.read_text()
    net, _, _ = load_checkpoint(path)
    int_model = to_int_model(net)
    result = pipeline.verify(net, int_model, header, mnist, log=lambda *a: None)
    assert result['n'] == 10000 and result['mismatches'] == 0 and result['c_acc'] > 0.2
    # The float model's features (the input of the first linear layer) are the integer model's, exactly.
    images = torch.from_numpy(result['images'][:500]).float()   # int8 with max|x| = 127: InputQuant keeps them
    flatten = next(i for i, m in enumerate(net.layers) if isinstance(m, torch.nn.Flatten))
    with torch.no_grad():
        features = net.eval().layers[:flatten + 1](images.view(-1, 1, 16, 16))
    stack = [op for op in int_model.ops if op.kind.per_channel]
    expected = reference_logits(type(int_model)(stack, int_model.num_classes), result['images'][:500])
    assert np.array_equal(features.numpy().reshape(500, -1), expected.reshape(500, -1))


@pytest.mark.slow
@pytest.mark.parametrize('qtype,stride,stem,shared', [('4bitsym', 4, [32, 16], True), ('2bitsym', 2, [16, 8], False),
                                                      ('Binary', 8, [16, 8, 8], False)])
def test_window_models_export_and_match_on_10000_images(small_mnist, mnist, run_dirs, tmp_path, qtype, stride, stem,
                                                        shared):
    """WindowFCMNIST: the stems compute exactly what the C engine computes; C == Python on every image (every type's
    window kernel: tests/test_kernels.py)."""
    path = short_training(small_mnist, run_dirs, model='WindowFCMNIST', QuantType=qtype, window_stride=stride,
                          window_stem=stem, window_shared=shared, network_width3=0)
    header = tmp_path / 'model.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval']) == 0
    text = header.read_text()
    assert f'BitNetMCU_fc_window_{qtype}(input + 16u * y + x, 8u, 8u, 16u, ' in text   # the image in place, no copy
    assert text.count('BitNetMCU_requantize(') == len(stem)
    net, _, _ = load_checkpoint(path)
    int_model = to_int_model(net)
    result = pipeline.verify(net, int_model, header, mnist, log=lambda *a: None)
    assert result['n'] == 10000 and result['mismatches'] == 0 and result['c_acc'] > 0.2
    # The float model's stem outputs (the head's input) are the integer model's, exactly, window by window.
    images = torch.from_numpy(result['images'][:500]).float()
    flatten = next(i for i, m in enumerate(net.layers) if isinstance(m, torch.nn.Flatten))
    with torch.no_grad():
        features = net.eval().layers[:flatten + 1](images.view(-1, 1, 16, 16))
    stem_ops = [op for op in int_model.ops if op.kind.per_channel]
    assert len(stem_ops) == len(stem) and stem_ops[0].weights.shape[0] == (1 if shared else ((16 - 8) // stride + 1) ** 2)
    expected = reference_logits(type(int_model)(stem_ops, int_model.num_classes), result['images'][:500])
    assert np.array_equal(features.numpy(), expected)
    run = compile_host_program(tmp_path, header, result['images'][:200], result['labels'][:200],
                               result['predictions'][:200], 'gcc')
    assert run.returncode == 0 and '0 mismatches' in run.stdout, run.stdout


@pytest.mark.slow
@pytest.mark.parametrize('requantizer,extra', [('shift', dict(QuantType='4bitsym', model='WindowFCMNIST',
                                                              network_width3=0)),
                                               ('reciprocal', dict(QuantType='FP130', model='CNNMNIST', cnn_width=6,
                                                                   conv_activations='int8', network_width3=0))])
def test_4_bit_activations_export_and_match_on_10000_images(small_mnist, mnist, run_dirs, tmp_path, requantizer,
                                                           extra):
    """activation_bits 4: the hidden layers multiply by look-up; C == Python on every image, and the float model
    agrees with the integer one on all but a few (NF4 on the chip: tests/test_mcu.py)."""
    path = short_training(small_mnist, run_dirs, activation_bits=4, requantizer=requantizer, **extra)
    header = tmp_path / 'model.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval']) == 0
    text = header.read_text()
    assert text.count(f"BitNetMCU_requantize4_{requantizer}(sums, act, ") == text.count('BitNetMCU_fc_products(act, ') >= 2
    assert text.count(f"BitNetMCU_products_{extra['QuantType']}[256] = {{") == 1   # one table, whatever the layers
    net, _, _ = load_checkpoint(path)
    int_model = to_int_model(net)
    assert not any(op.kind.multiplies(op) for op in int_model.ops[1:] if op.kind.weighted and op.input_bits == 4)
    result = pipeline.verify(net, int_model, header, mnist, log=lambda *a: None)
    assert result['n'] == 10000 and result['mismatches'] == 0 and result['c_acc'] > 0.5
    float_pred = net.eval()(normalize(mnist['test_x16'])).argmax(1).numpy()
    assert (float_pred != result['predictions']).mean() < 0.03


def test_header_is_reproducible_byte_for_byte(small_mnist, run_dirs, tmp_path):
    path = short_training(small_mnist, run_dirs)
    for name in ('a.h', 'b.h'):
        assert exportquant.main(['--checkpoint', str(path), '--output', str(tmp_path / name), '--no-eval']) == 0
    assert (tmp_path / 'a.h').read_bytes() == (tmp_path / 'b.h').read_bytes()
    assert b'generated by exportquant.py from ' + path.name.encode() in (tmp_path / 'a.h').read_bytes()


# published: 99.02 % and 98.78 %, the first from the original's engine, whose ShiftNorm requantizes by a power of
# two; ours requantizes exactly as the float model does (the float models: 98.99 % and 98.78 %)
@pytest.mark.parametrize('name,expected', [('fc_4bitsym_64_64_64_v02.pth', 0.9898),
                                           ('fc_4bitsym_64_64_64_octav.pth', 0.9878)])
def test_original_checkpoints_reproduce_their_accuracy(mnist, tmp_path, name, expected):
    path = original_checkpoint(name)
    model, cfg, _ = load_checkpoint(path)
    assert (cfg['model'], cfg['network_width1'], cfg['network_width3']) == ('FCMNIST', 64, 64)
    header = tmp_path / 'model.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval']) == 0
    result = pipeline.verify(model, to_int_model(model), header, mnist, log=lambda *a: None)
    assert result['mismatches'] == 0
    assert abs(result['c_acc'] - expected) <= 0.0005


def test_newest_original_layout_imports(small_mnist, run_dirs):
    # The newest original layout names the layers model.1, model.3, model.fc3, classifier, each with `.s`.
    path = short_training(small_mnist, run_dirs)
    ours, _, _ = load_checkpoint(path)
    state = ours.state_dict()
    renamed = {}
    for old, new in zip(['layers.0', 'layers.2', 'layers.4', 'layers.6'], ['model.1', 'model.3', 'model.fc3', 'classifier']):
        renamed[f'{new}.weight'], renamed[f'{new}.s'] = state[f'{old}.weight'], state[f'{old}.s']
    torch.save(renamed, run_dirs / 'newest_4bitsym.pth')   # the type as the original's file names state it
    imported, cfg, _ = load_checkpoint(run_dirs / 'newest_4bitsym.pth')
    assert (cfg['network_width1'], cfg['network_width2'], cfg['network_width3']) == (32, 24, 16)
    images = encode_input(normalize(small_mnist['test_x16']))
    assert np.array_equal(reference_logits(to_int_model(imported), images), reference_logits(to_int_model(ours), images))


def test_bad_inputs_are_clear_errors_and_leave_no_header(small_mnist, run_dirs, tmp_path, capsys):
    header = tmp_path / 'model.h'
    header.write_text('previous header\n')
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'\x80\x02 not a checkpoint')
    assert exportquant.main(['--checkpoint', str(corrupt), '--output', str(header)]) == 2
    assert 'cannot be read' in capsys.readouterr().err
    truncated = tmp_path / 'truncated.pth'
    original = original_checkpoint('fc_4bitsym_64_64_64_v02.pth')
    truncated.write_bytes(original.read_bytes()[:5000])
    assert exportquant.main(['--checkpoint', str(truncated), '--output', str(header)]) == 2
    assert 'cannot be read' in capsys.readouterr().err
    path = short_training(small_mnist, run_dirs)
    assert exportquant.main(['--checkpoint', str(path), '--set', 'QuantType=2bitsym', '--output', str(header)]) == 2
    assert "trained with QuantType='4bitsym'" in capsys.readouterr().err
    assert exportquant.main(['--checkpoint', str(original), '--set',
                             'network_width1=32', '--output', str(header)]) == 2
    assert 'network_width1=64' in capsys.readouterr().err
    assert exportquant.main(['--checkpoint', str(path), '--set', 'QuantType=3bit', '--output', str(header)]) == 2
    assert "'3bit' must be one of" in capsys.readouterr().err
    assert exportquant.main(['--checkpoint', str(tmp_path / 'missing.pth')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert header.read_text() == 'previous header\n'               # never half-written, never clobbered
    assert not list(tmp_path.glob('*.tmp'))


@pytest.mark.parametrize('overrides,at_load,at_export', [
    (dict(QuantType='None'), r"'QuantType': 'None' has no integer form \(exportable: Binary, Ternary",
     r"'None' \(float weights.*has no integer form"),
    (dict(NormType='LayerNorm'), r"'NormType': 'LayerNorm' subtracts a mean.*\(exportable: RMS, Lin\)", 'NormType LayerNorm'),
    (dict(WScale='PerOutput'), r"'WScale': 'PerOutput'.*\(exportable: PerTensor\)", 'WScale PerOutput'),
    (dict(model='CNNMNIST', cnn_width=4, conv_QuantType='FP130'),
     r"'conv_QuantType': 'FP130' has no convolution kernel for conv_activations int32 \(exportable: Binary, Ternary, "
     r"2bitsym, 4bitsym, 5bitsym, 4bit, 8bit, NF2, NF4\)", 'int8 conv kernel')])
def test_unexportable_models_are_refused_when_the_config_is_loaded(small_mnist, run_dirs, overrides, at_load, at_export):
    with pytest.raises(ConfigError, match=at_load + '.*set exportable: false'):
        short_training(small_mnist, run_dirs, **overrides)
    # For comparison they train with exportable: false; export still says why it cannot.
    model, _, _ = load_checkpoint(short_training(small_mnist, run_dirs, exportable=False, **overrides))
    with pytest.raises(ExportError, match=at_export):
        to_int_model(model)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_test_inference_cli_checks_the_header_is_current(small_mnist, run_dirs, tmp_path, capsys, monkeypatch, layout):
    path = short_training(small_mnist, run_dirs)
    header, data = tmp_path / 'model.h', tmp_path / 'data.h'
    assert exportquant.main(['--checkpoint', str(path), '--output', str(header), '--no-eval', '--layout', layout]) == 0
    assert f'#define BITNETMCU_MODEL_LAYOUT "{layout}"' in header.read_text()   # the layout is read from here
    monkeypatch.setattr(test_inference, 'load_dataset', lambda name: small_mnist)
    blob = tmp_path / 'data.bin'
    args = ['--checkpoint', str(path), '--header', str(header), '--test-data', str(data), '--test-blob', str(blob)]
    assert test_inference.main(args + ['--test-images', '50']) == 0
    out = capsys.readouterr().out
    assert '0 mismatching images' in out and '#define BITNETMCU_TEST_IMAGES 50' in data.read_text()
    assert read_blob(blob)['images'].shape == (1000, 256)   # every image of small_mnist
    text = header.read_text()
    digit = text.index('0x', text.index('BitNetMCU_layer0_weights')) + 2
    header.write_text(text[:digit] + ('1' if text[digit] != '1' else '2') + text[digit + 1:])   # a weight edited
    assert test_inference.main(args) == 2
    assert 'was edited after export' in capsys.readouterr().err
    other = path.with_name('other.pth')                      # a valid header of another checkpoint
    other.write_bytes(path.read_bytes())
    assert exportquant.main(['--checkpoint', str(other), '--output', str(header), '--no-eval', '--layout', layout]) == 0
    assert test_inference.main(args) == 2
    assert 'out of date' in capsys.readouterr().err
    text = header.read_text()
    unnamed = text.replace('#define BITNETMCU_MODEL_LAYOUT', '#define OTHER')   # self-consistent, no layout
    header.write_text(re.sub(r'#define BITNETMCU_MODEL_FINGERPRINT 0x\w{8}u\n', fingerprint_line(unnamed), unnamed))
    assert test_inference.main(args) == 2
    assert 'names no weight layout' in capsys.readouterr().err


def test_missing_default_checkpoint_says_train_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(exportquant, 'PROJECT_DIR', tmp_path)
    assert exportquant.main(['--set', 'runtag=never_trained']) == 2
    assert 'train it first' in capsys.readouterr().err


@pytest.mark.slow
def test_summary_plots_and_stats(tmp_path, capsys):
    model, _, _ = load_checkpoint(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'))
    int_model = to_int_model(model)
    # The original layout: 25,216 weights x 4 bits, nothing padded.
    exportquant.print_summary(int_model, pack_model(int_model, 'output-major'))
    out = capsys.readouterr().out
    assert ' 12608   weights' in out and 'activation buffers (RAM): 320 bytes' in out
    # Input-major: the classifier's 10 outputs take two words per input, and the first layer's 64 int16
    # row sums skip the background.
    exportquant.print_summary(int_model, pack_model(int_model, 'input-major'))
    assert ' 12928   weights' in capsys.readouterr().out
    exportquant.write_plots(int_model, tmp_path, log=lambda *a: None)
    assert (tmp_path / 'weight_histograms.png').stat().st_size > 1000
    assert (tmp_path / 'first_layer_tiles.png').stat().st_size > 1000
    stats = exportquant.weight_stats(int_model.weight_ops()[0])
    assert set(stats['codes']) <= set(range(-15, 16, 2)) and 0 < stats['capacity'] <= 1


def test_int32_conv_shifts_are_the_smallest_that_never_overflow():
    """The worst image for the worst weights stays in int32 with the chosen shifts, and one bit less overflows."""
    from intmodel import CONV, IntModel, IntOp, choose_int32_shifts
    convs = [IntOp(CONV, QUANT_TYPES['8bit'], np.full((1, 9), w), name=f'conv{k}') for k, w in enumerate((-128, 127, 127))]
    choose_int32_shifts(convs)
    shifts = [op.shift for op in convs]
    assert shifts[0] == 0 and shifts[-1] == 0 and shifts[1] > 0
    worst = np.full((1, 256), -128)                      # times -128: the largest first sums, all positive
    reference_logits(IntModel(convs, 10), worst)          # raises if any sum leaves int32
    convs[1].shift -= 1
    with pytest.raises(ExportError, match='sums exceed 32 bits'):
        reference_logits(IntModel(convs, 10), worst)
