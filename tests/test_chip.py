"""The firmware a user flashes: built with ch32fun, sized, and run exactly as flashed on the emulated chip
(mcu/chipsim.py). The emulator's checks are proven first on small programs written for the purpose."""
import os
import subprocess

import pytest

import chips
import pipeline
from conftest import ROOT, original_checkpoint
from mcu import chipsim
from test_export import short_training

SHARED_CH32FUN = ROOT.parent / 'shared' / 'ch32fun' / 'ch32fun'


def ch32fun():
    """The ch32fun SDK from ../shared. Outside CI a checkout without it skips; in CI its absence fails."""
    if not (SHARED_CH32FUN / 'ch32fun.mk').exists():
        if os.environ.get('CI'):
            pytest.fail(f"{SHARED_CH32FUN} is missing: CI must provide ../shared beside the checkout")
        pytest.skip(f"{SHARED_CH32FUN} not present (../shared beside the checkout)")
    return SHARED_CH32FUN


def program(tmp_path, body, march='rv32ec'):
    """A bare program at the chip's reset address: `body`, then a jump to itself (the end)."""
    source = tmp_path / 'program.S'
    source.write_text(f".globl _start\n_start:\n{body}\n1:  j 1b\n")
    elf = tmp_path / 'program.elf'
    subprocess.run(['riscv64-unknown-elf-gcc', f'-march={march}', '-mabi=ilp32e', '-nostdlib', '-Wl,-Ttext=0',
                    '-Wl,--no-warn-rwx-segments', str(source), '-o', str(elf)], check=True)
    return elf


def run(elf, target):
    chip = chipsim.Chip(elf, target)
    chip.run()
    return chip


def test_a_program_runs_to_its_end_and_its_stack_is_measured(tmp_path):
    chip = run(program(tmp_path, 'li sp, 0x20000800\naddi sp, sp, -64\nsw zero, 0(sp)\naddi sp, sp, 64'), 'CH32V003')
    assert chip.stack_bytes == 64 and chip.instructions < 20


def test_the_stack_leaving_sram_is_caught(tmp_path):
    elf = program(tmp_path, 'li sp, 0x20000800\nli t0, 0x900\nsub sp, sp, t0\nsw zero, 0(sp)')
    with pytest.raises(chipsim.ChipError, match=r'pc 0x[0-9a-f]+: the stack pointer 0x1fffff00 left SRAM'):
        run(elf, 'CH32V003')


@pytest.mark.parametrize('instruction,target,message', [
    ('mul a0, a0, a1', 'CH32V003', 'a mul instruction .*: the CH32V003 has no multiplier'),
    ('divu a0, a0, a1', 'CH32V002', 'a div instruction .*: the CH32V002 has no divider'),
    ('rem a0, a0, a1', 'CH32V003', 'a div instruction .*: the CH32V003 has no divider')])
def test_instructions_the_chip_lacks_are_caught(tmp_path, instruction, target, message):
    elf = program(tmp_path, f'li a1, 3\n{instruction}', march='rv32em')
    with pytest.raises(chipsim.ChipError, match=message):
        run(elf, target)


def test_a_multiply_runs_on_the_ch32v002(tmp_path):
    assert run(program(tmp_path, 'li a1, 3\nmul a0, a1, a1', march='rv32em'), 'CH32V002').instructions > 2


@pytest.mark.parametrize('body,target,message', [
    ('li t0, 0x30000000\nlw a0, 0(t0)', 'CH32V003', 'access to unmapped address 0x30000000'),
    ('li t0, 0x20000900\nsw zero, 0(t0)', 'CH32V003', 'access to 0x20000900, past the 2048-byte SRAM'),
    ('li t0, 0x100\nsw zero, 0(t0)', 'CH32V003', 'write to flash at 0x00000100'),
    ('li t0, 0x40021040\nlw a0, 0(t0)', 'CH32V003', 'read of 0x40021040, a peripheral register the firmware has no'),
    ('li t0, 0x40011000\nsw zero, 0(t0)', 'CH32V002', 'access to unmapped address 0x40011000')])
def test_accesses_outside_the_chip_are_caught_with_pc_and_address(tmp_path, body, target, message):
    with pytest.raises(chipsim.ChipError, match=r'pc 0x[0-9a-f]{8}: ' + message):
        run(program(tmp_path, body), target)


def test_an_image_bigger_than_flash_is_refused_before_it_runs(tmp_path):
    with pytest.raises(chipsim.ChipError, match=r'a segment at 0x0 \(\d+ bytes\) is not in the 16384-byte flash'):
        chipsim.Chip(program(tmp_path, '.space 20000'), 'CH32V003')


def test_sram_beyond_2k_exists_on_the_ch32v002(tmp_path):
    run(program(tmp_path, 'li t0, 0x20000900\nsw zero, 0(t0)'), 'CH32V002')


# ------------------------------------------------------------------------------------------------
# The real image, built with ch32fun
# ------------------------------------------------------------------------------------------------

def make(tmp_path, target, header, blob, *goals):
    return chips.make(target, header, blob, tmp_path / target, *goals, f'CH32FUN={ch32fun()}')


@pytest.mark.slow
@pytest.mark.parametrize('target', ['CH32V003', 'CH32V002'])
def test_flashed_image_fits_and_runs_on_the_emulated_chip(mnist, tmp_path, target):
    ch32fun()
    pipeline.measure_model(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'), tmp_path, mnist, targets=())
    run_ = make(tmp_path, target, tmp_path / 'model.h', tmp_path / 'test.bin', 'firmware', 'chip-sim')
    assert run_.returncode == 0, run_.stdout[-3000:] + run_.stderr[-3000:]
    assert 'images 3 correct 3 mismatches 0' in run_.stdout
    assert f'{target} (emulated chip, the flashed image)' in run_.stdout
    flash, ram = chips.section_sizes(tmp_path / target / 'firmware.elf')
    assert flash == (tmp_path / target / 'firmware.bin').stat().st_size     # the bytes minichlink writes
    if target == 'CH32V003':
        # room left for a user's code: 15,136 bytes since the exact 8-bit requantization (56 bytes for integer
        # predictions equal to the float model's), 15,080 since the two-inputs-a-pass look-ups (14,936 before:
        # 144 bytes for 15 % fewer instructions on this model, 18 % on the windowed ones)
        assert flash <= 15150
        assert 'no mul/div instruction, no libgcc multiply or divide' in run_.stdout
    else:
        assert 'no div/rem instruction, no libgcc divide' in run_.stdout


@pytest.mark.slow
def test_wrong_predictions_on_the_chip_fail_chip_sim(mnist, tmp_path):
    ch32fun()
    pipeline.measure_model(original_checkpoint('fc_4bitsym_64_64_64_v02.pth'), tmp_path, mnist, targets=(),
                           images=5)
    blob = tmp_path / 'test.bin'
    data = bytearray(blob.read_bytes())
    data[20 + 5 * 256 + 5 + 1] ^= 1                                  # the host's prediction for image 1
    blob.write_bytes(bytes(data))
    run_ = make(tmp_path, 'CH32V003', tmp_path / 'model.h', blob, 'chip-sim')
    assert run_.returncode != 0 and '1 predictions differ from the host' in run_.stderr
    assert 'MISMATCH image 1' in run_.stdout


@pytest.mark.slow
def test_an_image_that_does_not_fit_fails_with_one_line(small_mnist, mnist, run_dirs, tmp_path):
    ch32fun()
    path = short_training(small_mnist, run_dirs, QuantType='8bit', fc1_QuantType='8bit', network_width1=64,
                          network_width2=64, network_width3=64)
    pipeline.measure_model(path, tmp_path, mnist, targets=(), images=20)
    run_ = make(tmp_path, 'CH32V003', tmp_path / 'model.h', tmp_path / 'test.bin', 'firmware')
    assert run_.returncode != 0
    assert run_.stderr.count('does not fit') == 1 and 'CH32V003: the image does not fit: flash' in run_.stderr
    assert 'bytes over its 16384' in run_.stderr
