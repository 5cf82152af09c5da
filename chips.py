"""The chips BitNetMCU targets, and the firmware for them: built (mcu/Makefile), run on an emulated core (QEMU, every
test image, exact instruction counts), sized against the chip and checked for the arithmetic it lacks.

CHIPS, the chip table, is read by the emulated runs (the QEMU cpu), the emulated chip (mcu/chipsim.py: SRAM and
which instructions it has), the fit checks and the sweeps. parse_report() reads the summary that
mcu/BitNetMCUdemo.c prints at the end of every run, on QEMU and on the emulated chip alike. Nothing here imports
torch: mcu/firmware.py, which make runs for every build, starts in a blink.
"""
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fileio import PROJECT_DIR, read_or_explain
from testdata import read_blob, write_blob

MCU_DIR = PROJECT_DIR / 'mcu'


@dataclass(frozen=True)
class ChipSpec:
    name: str
    flash: int            # bytes
    ram: int              # SRAM bytes
    multiplier: bool      # has mul (RV32M's multiply half, Zmmul)
    divider: bool         # has div/rem
    qemu_cpu: str         # the QEMU virt cpu that has the same instructions


CHIPS = {chip.name: chip for chip in (
    ChipSpec('CH32V003', 16 * 1024, 2 * 1024, multiplier=False, divider=False,
             qemu_cpu='rv32,m=false,a=false,f=false,d=false'),
    ChipSpec('CH32V002', 16 * 1024, 4 * 1024, multiplier=True, divider=False,
             qemu_cpu='rv32,a=false,f=false,d=false'),
)}

# What BitNetMCUdemo.c prints last; the peak stack only in the emulator build (it measures its own stack there).
REPORT = re.compile(r'images (\d+) correct (\d+) mismatches (\d+)\n(\w+) per inference: total (\d+) min (\d+) '
                    r'max (\d+)(?:\npeak stack of one inference: (\d+) bytes)?')


def parse_report(console):
    """The firmware's summary in `console` as a dict (images, correct, mismatches, counter, total, mean, min, max,
    and stack where it was measured), or None when there is none."""
    match = REPORT.search(console)
    if match is None:
        return None
    images, correct, mismatches, counter, total, least, most, stack = match.groups()
    return {'images': int(images), 'correct': int(correct), 'mismatches': int(mismatches), 'counter': counter,
            'total': int(total), 'mean': int(total) / max(int(images), 1), 'min': int(least), 'max': int(most),
            'stack': None if stack is None else int(stack)}


class FirmwareError(RuntimeError):
    """A firmware file or run that cannot be used; the message says why and what to do."""


EM_RISCV = 243


def check_elf(path):
    """Refuse, before anything runs it, a file that is not a 32-bit little-endian RISC-V ELF executable (a text
    file, an x86 build, an empty or cut-short file); the message names what it is and the cure."""
    head = read_or_explain(path, 20, "firmware's .elf", FirmwareError, 'build the firmware first (make -C mcu)',
                           head=True)
    if not head.startswith(b'\x7fELF') or len(head) < 20:
        what = 'empty' if not head else 'cut short' if head.startswith(b'\x7fELF') else 'no ELF magic'
        raise FirmwareError(f"{path} is not an ELF file ({what}); give the firmware's .elf (make -C mcu builds it)")
    machine = int.from_bytes(head[18:20], 'little' if head[5] == 1 else 'big')
    if head[4] != 1 or head[5] != 1 or machine != EM_RISCV:
        raise FirmwareError(f"{path} is an ELF for machine {machine} ({'32' if head[4] == 1 else '64'}-bit), not a "
                            f"32-bit RISC-V one (machine {EM_RISCV}); give the firmware built by make -C mcu")


# ------------------------------------------------------------------------------------------------
# The firmware for a chip: built (mcu/Makefile), run emulated, sized
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


def measure_firmware(header, blob, target, build, timeout=600):
    """Build the firmware for one chip, run it on every image of the blob (within `timeout` seconds) and link it
    for the chip. Returns the emulator's report ('sim'), flash and static RAM of the chip build (None when it
    does not link), whether it fits (flash, and RAM with the peak stack), why not, and whether it is multiplier-free."""
    out = make(target, header, blob, build, str(Path(build) / 'sim.elf'))
    if out.returncode:
        raise FirmwareError(f"firmware build for {target} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    sim = run_qemu(Path(build) / 'sim.elf', blob, target, timeout, model_header=header)
    links = make(target, header, blob, build, str(Path(build) / 'flash.elf')).returncode == 0
    flash, ram = section_sizes(Path(build) / 'flash.elf') if links else (None, None)
    why = fit_problem(target, flash, ram, sim['stack']) if links else 'does not link for the chip'
    return {'sim': sim, 'flash': flash, 'ram': ram, 'fits': not why, 'why': why or '',
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
