"""The chain from a checkpoint to the chip, for one model: export -> C against Python on the test set -> test blob
-> firmware built, run on an emulated core (QEMU: every image, exact instruction counts) and sized for each chip.

    row = measure_model('modeldata/x.pth', 'build/work', load_dataset('MNIST'))   # everything, for every chip

bench/, docs/, tests/, sweep.py and the command-line tools (test_inference.py, mcu/firmware.py) use it.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cengine import build_engine, run_c
from checkpoint import load_checkpoint
from chips import CHIPS, FirmwareError, check_elf, parse_report
from dataset import normalize
from fileio import PROJECT_DIR, atomic_write
from intmodel import ExportError, encode_input, pack_model, reference_logits, to_int_model
from modelheader import header_text
from testdata import header_fingerprint, read_blob, write_blob

MCU_DIR = PROJECT_DIR / 'mcu'


# ------------------------------------------------------------------------------------------------
# C against Python on the test set
# ------------------------------------------------------------------------------------------------

def predict_test_set(model, int_model, data, dataset='the dataset'):
    """The test images as the MCU sees them (int8), their labels, the float model's predicted classes and
    the integer reference's logits (with the seconds the reference took)."""
    if data['num_classes'] != int_model.num_classes:
        raise ExportError(f"the model has {int_model.num_classes} outputs, {dataset} has {data['num_classes']} "
                          "classes: pass --set dataset=<the dataset it was trained on>")
    x, y = normalize(data['test_x16']), data['test_y'].numpy()
    images = encode_input(x)
    with torch.no_grad():
        float_pred = model.eval()(x).argmax(1).numpy()
    start = time.perf_counter()
    logits = reference_logits(int_model, images)
    return {'images': images, 'labels': y, 'float_pred': float_pred, 'logits': logits,
            'python_time': time.perf_counter() - start}


def verify(model, int_model, header, data, log=print, dataset='the dataset'):
    """Compare C and Python on every test image. Returns a dict of accuracies, mismatches and timings."""
    p = predict_test_set(model, int_model, data, dataset)
    ffi, lib = build_engine(header, log=log)
    images, y, float_pred, py_logits = p['images'], p['labels'], p['float_pred'], p['logits']
    start = time.perf_counter()
    c_logits, c_classes = run_c(ffi, lib, images, int_model.num_classes)
    c_time = time.perf_counter() - start
    logit_mismatch = int((c_logits != py_logits).any(axis=1).sum())
    class_mismatch = int((c_classes != py_logits.argmax(1)).sum())
    return {'n': len(y), 'float_acc': float((float_pred == y).mean()),
            'python_acc': float((py_logits.argmax(1) == y).mean()), 'c_acc': float((c_classes == y).mean()),
            'mismatches': max(logit_mismatch, class_mismatch), 'c_time': c_time, 'python_time': p['python_time'],
            'images': images, 'labels': y, 'predictions': c_classes}


# ------------------------------------------------------------------------------------------------
# The firmware: built, run emulated, sized
# ------------------------------------------------------------------------------------------------

CROSS = 'riscv64-unknown-elf-'
TESTSET_ADDR = 0x80400000
QEMU_BLOB_ROOM = 0x88000000 - TESTSET_ADDR   # QEMU virt's 128 MB of RAM end at 0x88000000

def run_qemu(elf, blob, target, timeout=600, model_header=None):
    """Run the emulator build on the images of blob; returns the parsed report (dict). A missing, foreign or
    truncated blob, or one made for another model header than model_header, is named here."""
    read_blob(blob, limit=0, model_header=model_header)
    check_elf(elf)
    if Path(blob).stat().st_size > QEMU_BLOB_ROOM:
        raise FirmwareError(f"{blob} holds {Path(blob).stat().st_size:,} bytes; the emulator's RAM has room for "
                            f"{QEMU_BLOB_ROOM:,} from {TESTSET_ADDR:#x}: write a blob of fewer images")
    cmd = ['qemu-system-riscv32', '-M', 'virt', '-bios', 'none', '-cpu', CHIPS[target].qemu_cpu, '-icount', 'shift=0',
           '-nographic', '-kernel', str(elf), '-device', f'loader,file={blob},addr={TESTSET_ADDR:#x},force-raw=on']
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"QEMU did not finish within {timeout}s") from None
    report = parse_report(out.stdout)
    if report is None or report['stack'] is None:
        raise FirmwareError(f"no report from the firmware (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-1000:]}")
    return {**report, 'status': out.returncode, 'output': out.stdout}


SRAM_BASE = 0x20000000


def section_sizes(elf):
    """(flash bytes, static RAM bytes) of a chip build from its section headers: flash holds every section
    below SRAM plus the initial values of .data; RAM holds every section at SRAM (.data, .bss)."""
    check_elf(elf)
    out = subprocess.run([CROSS + 'size', '-A', str(elf)], capture_output=True, text=True, check=True).stdout
    flash = ram = 0
    for name, size, address in re.findall(r'^(\.[\w.]+)\s+(\d+)\s+(\d+)', out, re.M):
        if name.startswith(('.debug', '.comment', '.riscv', '.note')):
            continue
        if int(address) >= SRAM_BASE:
            ram += int(size)
            flash += int(size) if name == '.data' else 0
        else:
            flash += int(size)
    return flash, ram


def peak_stack(sim_elf, blob, target, timeout=600):
    """Peak stack of one inference: the emulator build run on the blob's first 3 images."""
    with tempfile.TemporaryDirectory() as tmp:
        three = Path(tmp) / 'three.bin'
        write_blob(three, **read_blob(blob, limit=3))
        return run_qemu(sim_elf, three, target, timeout)['stack']


def fit_problem(target, flash, ram, stack):
    """None when the image fits the chip, else what is over and by how much."""
    flash_max, ram_max = CHIPS[target].flash, CHIPS[target].ram
    over = []
    if flash > flash_max:
        over.append(f"flash {flash - flash_max} bytes over its {flash_max}")
    if ram + stack > ram_max:
        over.append(f"RAM (static + stack) {ram + stack - ram_max} bytes over its {ram_max}")
    return '; '.join(over) or None


MULTIPLY = r'\t(mul|mulh|mulhu|mulhsu)\s|<__mul\w*>'
DIVIDE = r'\t(div|divu|rem|remu)\s|<__(div|udiv|mod|umod)\w*>'


def multiply_uses(elf, pattern=MULTIPLY + '|' + DIVIDE):
    """Lines of the disassembly that multiply or divide (instructions, calls into libgcc's helpers)."""
    check_elf(elf)
    dump = subprocess.run([CROSS + 'objdump', '-d', str(elf)], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in dump.splitlines() if re.search(pattern, line)]


def forbidden_arithmetic(elf, target):
    """What the chip cannot run fast or at all: any multiply or divide on the CH32V003 (no multiplier:
    libgcc's loops), any divide on the CH32V002 (a multiplier, no divider)."""
    return multiply_uses(elf, MULTIPLY + '|' + DIVIDE if target == 'CH32V003' else DIVIDE)


def make(target, header, blob, build, *goals, timeout=900):
    """mcu/Makefile for one chip, model header and test blob, building into `build`."""
    return subprocess.run(['make', '-C', str(MCU_DIR), *goals, f'TARGET_MCU={target}', f'MODEL_HEADER={header}',
                           f'TEST_BLOB={blob}', f'BUILD={build}', f'PY={sys.executable}'],
                          capture_output=True, text=True, timeout=timeout)


def measure_firmware(header, blob, target, build):
    """Build the firmware for one chip, run it on every image of the blob and link it for the chip.
    Returns the emulator's report ('sim'), flash and static RAM of the chip build (None when it does not
    link), whether it fits (flash, and RAM with the peak stack) and whether it is multiplier-free."""
    out = make(target, header, blob, build, str(Path(build) / 'sim.elf'))
    if out.returncode:
        raise FirmwareError(f"firmware build for {target} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    sim = run_qemu(Path(build) / 'sim.elf', blob, target, model_header=header)
    links = make(target, header, blob, build, str(Path(build) / 'flash.elf')).returncode == 0
    flash, ram = section_sizes(Path(build) / 'flash.elf') if links else (None, None)
    return {'sim': sim, 'flash': flash, 'ram': ram, 'fits': links and not fit_problem(target, flash, ram, sim['stack']),
            'nomul': not multiply_uses(Path(build) / 'sim.elf')}


IMAGE_LINE = re.compile(r'image \S+: flash (\d+) of \d+ bytes .*RAM (\d+) static \+ (\d+) stack')


def flashed_image(header, blob, target, build, ch32fun):
    """`make firmware` for one chip with the ch32fun SDK: the image's flash, static RAM and stack when it
    builds, fits and passes the chip's arithmetic check; else the one line that says why not."""
    out = make(target, header, blob, build, 'firmware', f'CH32FUN={ch32fun}')
    match = IMAGE_LINE.search(out.stdout)
    if out.returncode == 0 and match:
        flash, ram, stack = map(int, match.groups())
        return {'fits': True, 'flash': flash, 'ram': ram + stack, 'why': '', 'soft_mul': 'in software' in out.stdout}
    text = out.stderr + out.stdout
    arithmetic = re.search(r'(\d+) (multiply/divide|divide) uses the', text)
    too_big = re.search(r'the image does not fit: (.*)', text)
    errors = [line[len('error: '):] for line in text.splitlines() if line.startswith('error: ')]
    why = (f"{arithmetic.group(1)} {arithmetic.group(2)} uses, which the {target} cannot run" if arithmetic else
           too_big.group(1) if too_big else errors[0] if errors else 'make firmware failed')
    return {'fits': False, 'flash': None, 'ram': None, 'why': why, 'soft_mul': False}


def measure_model(checkpoint, work, data, layout='input-major', targets=tuple(CHIPS), header=None, images=None):
    """The whole chain for one checkpoint: export the header (to `header`, default work/model.h) in
    `layout`, prove C == Python on the test set (or its first `images`), write the test blob, and measure
    the firmware on every target (mismatches on the emulated chip are an error too).
    Returns {'verify': verify()'s result, 'int_model', 'packed': its packed layers,
    target: measure_firmware's result}."""
    work = Path(work)
    header = Path(header) if header else work / 'model.h'
    blob = work / 'test.bin'
    model, _, _ = load_checkpoint(checkpoint)
    int_model = to_int_model(model)
    atomic_write(header, header_text(int_model, Path(checkpoint).name, layout))
    if images is not None:
        data = {**data, 'test_x16': data['test_x16'][:images], 'test_y': data['test_y'][:images]}
    r = verify(model, int_model, header, data, log=lambda *a: None)
    if r['mismatches']:
        raise FirmwareError(f"{checkpoint}: C and Python disagree on {r['mismatches']} images")
    write_blob(blob, r['images'], r['labels'], r['predictions'], header_fingerprint(header))
    row = {'verify': r, 'int_model': int_model, 'packed': pack_model(int_model, layout)}
    for target in targets:
        row[target] = measure_firmware(header, blob, target, work / target)
        if row[target]['sim']['mismatches']:
            raise FirmwareError(f"{checkpoint} on {target}: {row[target]['sim']['mismatches']} mismatches")
    return row
