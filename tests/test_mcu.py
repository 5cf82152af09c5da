"""The firmware: built for RV32EC with the cross-compiler, run on all test images in QEMU with exact
instruction counts, checked for memory fit and for multiplies. Real tools, no mocks."""
import re
import subprocess
import sys

import pytest

import chips
import pipeline
from conftest import ROOT, original_checkpoint
from test_export import short_training
from testdata import BLOB_HEADER_BYTES

pytestmark = pytest.mark.slow
MCU = ROOT / 'mcu'


def export_with_test_data(checkpoint, tmp_path, data):
    """Header and test-data blob of a checkpoint, as `make` produces them (C == Python checked on the way)."""
    result = pipeline.measure_model(checkpoint, tmp_path, data, targets=())
    return tmp_path / 'model.h', tmp_path / 'test.bin', result['verify']


def make(tmp_path, target, header, blob, *goals):
    return chips.make(target, header, blob, tmp_path / target, *goals)


@pytest.mark.parametrize('target', ['CH32V003', 'CH32V002'])
def test_original_model_on_emulated_core_matches_host_on_10000_images(mnist, tmp_path, target):
    header, blob, host = export_with_test_data(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'), tmp_path, mnist)
    run = make(tmp_path, target, header, blob, 'sim', 'size', 'nomul')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{target} (emulated, sim.elf): 10000 images, accuracy 98.98%, 0 mismatches" in run.stdout
    assert f"{target}: flash" in run.stdout and 'fits' in run.stdout
    if target == 'CH32V003':
        assert 'no mul/div instruction, no libgcc multiply or divide' in run.stdout
    assert host['c_acc'] == 0.9898   # the original's engine: 99.02 % (its ShiftNorm; tests/test_export.py)


def test_emulator_reports_mismatches_and_fails(mnist, tmp_path):
    header, blob, _ = export_with_test_data(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'), tmp_path, mnist)
    data = bytearray(blob.read_bytes())
    data[BLOB_HEADER_BYTES + 10000 * 256 + 10000 + 7] ^= 1          # corrupt the expected prediction of image 7
    blob.write_bytes(bytes(data))
    run = make(tmp_path, 'CH32V003', header, blob, 'sim')
    assert run.returncode != 0
    assert 'MISMATCH image 7' in run.stdout or 'MISMATCH image 7' in run.stderr or '1 mismatches' in run.stdout


def test_multiplying_types_are_caught_by_the_multiplier_check(small_mnist, mnist, run_dirs, tmp_path):
    path = short_training(small_mnist, run_dirs, QuantType='8bit', fc1_QuantType='8bit')
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'nomul')
    assert run.returncode != 0 and '__mulsi3' in run.stdout
    run = make(tmp_path, 'CH32V003', header, blob, 'sim')   # still correct, via libgcc's multiply
    assert run.returncode == 0 and ', 0 mismatches' in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_small_cnn_runs_and_fits_ch32v003(small_mnist, mnist, run_dirs, tmp_path):
    """The per-channel stack runs in place in one buffer, so a small CNN fits the 2 KB chip."""
    path = short_training(small_mnist, run_dirs, model='CNNMNIST', cnn_width=8, network_width1=16,
                          network_width2=16, network_width3=0)
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'sim', 'size')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '10000 images' in run.stdout and ', 0 mismatches' in run.stdout and ': fits' in run.stdout


def test_wide_cnn_does_not_fit_ch32v003_but_fits_ch32v002(small_mnist, mnist, run_dirs, tmp_path):
    path = short_training(small_mnist, run_dirs, model='CNNMNIST', cnn_width=64, network_width1=16,
                          network_width2=16, network_width3=0)
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    small = make(tmp_path, 'CH32V003', header, blob, 'size')
    assert small.returncode != 0 and 'DOES NOT FIT' in small.stdout
    big = make(tmp_path, 'CH32V002', header, blob, 'size')
    assert big.returncode == 0 and ': fits' in big.stdout, big.stdout[-3000:] + big.stderr[-3000:]


@pytest.mark.parametrize('conv_type', ['FP130', '4bitsym'])
def test_int8_activation_cnn_is_multiplier_free_and_exact_on_ch32v003(small_mnist, mnist, run_dirs, tmp_path,
                                                                      conv_type):
    path = short_training(small_mnist, run_dirs, model='CNNMNIST', cnn_width=4, network_width1=16,
                          network_width2=16, network_width3=0, conv_activations='int8', conv_QuantType=conv_type,
                          QuantType='4bitsym', fc1_QuantType='2bitsym')
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'sim', 'size', 'nomul')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '10000 images' in run.stdout and ', 0 mismatches' in run.stdout and ': fits' in run.stdout
    assert 'no mul/div instruction, no libgcc multiply or divide' in run.stdout


def test_window_model_is_multiplier_free_and_exact_on_ch32v003(small_mnist, mnist, run_dirs, tmp_path):
    """The quadrant model of the original's 2026 designs, a stem per window: QEMU's RV32EC core == the host."""
    path = short_training(small_mnist, run_dirs, model='WindowFCMNIST', window_stride=8, window_stem=[32, 16],
                          window_shared=False, network_width1=32, network_width2=32, network_width3=0)
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'sim', 'size', 'nomul')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '10000 images' in run.stdout and ', 0 mismatches' in run.stdout and ': fits' in run.stdout
    assert 'no mul/div instruction, no libgcc multiply or divide' in run.stdout


def test_nf4_with_4_bit_activations_is_multiplier_free_on_ch32v003(small_mnist, mnist, run_dirs, tmp_path):
    """NF4 levels are no powers of two: the first layer's products are shifts and adds, the later ones look-ups."""
    path = short_training(small_mnist, run_dirs, QuantType='NF4', activation_bits=4)
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'sim', 'size', 'nomul')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '10000 images' in run.stdout and ', 0 mismatches' in run.stdout and ': fits' in run.stdout
    assert 'no mul/div instruction, no libgcc multiply or divide' in run.stdout


def test_64_wide_int8_activation_cnn_fits_the_ram_of_ch32v003(small_mnist, mnist, run_dirs, tmp_path):
    """int8 planes: the 64-wide CNN that needs 2,148 bytes of stack with int32 planes fits in 2 KB."""
    path = short_training(small_mnist, run_dirs, model='CNNMNIST', cnn_width=64, network_width1=16,
                          network_width2=16, network_width3=0, conv_activations='int8', conv_QuantType='FP130')
    header, blob, _ = export_with_test_data(path, tmp_path, mnist)
    run = make(tmp_path, 'CH32V003', header, blob, 'size')
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ram = re.search(r'RAM (\d+) static \+ (\d+) peak stack = (\d+) of 2048 bytes: fits', run.stdout)
    assert ram and int(ram.group(3)) <= 2048, run.stdout[-2000:]


@pytest.mark.parametrize('offset,what', [(4, 'format version'), (16, 'model header fingerprint')])
def test_blob_of_another_format_or_header_is_refused_by_the_firmware_itself(mnist, tmp_path, offset, what):
    header, blob, _ = export_with_test_data(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'), tmp_path, mnist)
    assert make(tmp_path, 'CH32V003', header, blob, str(tmp_path / 'CH32V003' / 'sim.elf')).returncode == 0
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0x0C                             # another version, or data made for another header
    blob.write_bytes(bytes(data))
    run = subprocess.run(['qemu-system-riscv32', '-M', 'virt', '-bios', 'none', '-cpu', chips.CHIPS['CH32V003'].qemu_cpu,
                          '-nographic', '-kernel', str(tmp_path / 'CH32V003' / 'sim.elf'), '-device',
                          f'loader,file={blob},addr={chips.TESTSET_ADDR:#x},force-raw=on'],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0, what
    assert 'not a version-2 BitNetMCU blob made for this model header; run test_inference.py' in run.stdout
    out = subprocess.run([sys.executable, str(MCU / 'firmware.py'), 'sim', '--elf', str(tmp_path / 'CH32V003' / 'sim.elf'),
                          '--blob', str(blob), '--header', str(header)], capture_output=True, text=True)
    assert out.returncode == 2 and 'run test_inference.py' in out.stderr
    assert ('format version' if offset == 4 else 'was made for another model header') in out.stderr


def test_missing_header_is_a_clear_error(tmp_path):
    run = make(tmp_path, 'CH32V003', tmp_path / 'nope.h', tmp_path / 'nope.bin', 'sim')
    assert run.returncode != 0 and 'run exportquant.py first' in run.stderr
    run = subprocess.run(['make', '-C', str(MCU), 'sim', 'TARGET_MCU=CH32V001'], capture_output=True, text=True)
    assert run.returncode != 0 and 'is not CH32V003 or CH32V002' in run.stderr
