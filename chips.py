"""The chips BitNetMCU targets and the report their firmware prints: each defined here once.

CHIPS is read by the emulated runs (mcu/firmware.py: the QEMU cpu), the emulated chip (mcu/chipsim.py: SRAM and
which instructions it has), the fit checks and the sweeps. parse_report() reads the summary that
mcu/BitNetMCUdemo.c prints at the end of every run, on QEMU and on the emulated chip alike.
"""
import re
from dataclasses import dataclass

from fileio import read_or_explain


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
