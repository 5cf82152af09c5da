"""The firmware exactly as flashed, on an emulated CH32V003 / CH32V002 (the Unicorn engine executes the RV32 code).

    python chipsim.py --elf build/CH32V003/firmware.elf --target CH32V003       # what make chip-sim runs

Loads the ELF that `make flash` writes (ch32fun's start-up code, clock set-up and debug printf included)
into the chip's memory map and prints the console as `minichlink -T` shows it:
  flash    0x00000000 (and its alias 0x08000000), 16 KB, read-only
  SRAM     0x20000000, 2 KB (CH32V003) or 4 KB (CH32V002)
  RCC      0x40021000  clock control: ready flags follow their enable bits, the clock switch follows SW
  FLASH    0x40022000  wait states (ACTLR)
  DMDATA   0xE00000F4/F8  the debug-printf mailbox minichlink reads: characters are taken at once
  SysTick  0xE000F000  CNT counts retired instructions (the emulator has no cycle model)
Anything else stops the run with the PC and the address: an access outside these regions or to a register
the firmware is not expected to touch, a write to flash, an instruction the chip lacks (mul/div on the
CH32V003, div/rem on the CH32V002), the stack leaving SRAM or running into static data. The firmware
compares its predictions with the host's (its test data); exit status 1 when any differs or the report
is missing, 2 when the emulation stops on an error.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the top level: chips.py
from chips import CHIPS, FirmwareError, check_elf, parse_report  # noqa: E402

FLASH, FLASH_ALIAS, SRAM = 0x00000000, 0x08000000, 0x20000000
PAGE = 0x1000
MAX_INSTRUCTIONS = 50_000_000


class ChipError(FirmwareError):
    """The firmware did something the chip would not survive; the message names the PC and the address."""


def m_extension(word):
    """'mul' / 'div' for an RV32M instruction word (OP opcode, funct7 1), else None."""
    if word & 0x7F == 0x33 and word >> 25 == 1:
        return 'mul' if (word >> 12) & 7 < 4 else 'div'
    return None


class Chip:
    def __init__(self, elf, target):
        from unicorn import UC_ARCH_RISCV, UC_MODE_RISCV32, Uc
        check_elf(elf)
        spec = CHIPS[target]
        self.flash_size, self.sram_size, self.may_mul, self.may_div = spec.flash, spec.ram, spec.multiplier, spec.divider
        self.target, self.uc = target, Uc(UC_ARCH_RISCV, UC_MODE_RISCV32)
        self.console, self.instructions, self.pc, self.error = [], 0, 0, None
        self.lowest_sp, self.checked, self.last, self.repeats = SRAM + self.sram_size, {}, None, 0
        self.registers, self.stack_set = {}, False
        self._load(elf)
        self._map_peripherals()
        self._hook()

    # --- memory ---------------------------------------------------------------------------------
    def _load(self, elf):
        from elftools.elf.elffile import ELFFile
        from unicorn import UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ
        image = bytearray(self.flash_size)
        with open(elf, 'rb') as f:
            elffile = ELFFile(f)
            self.entry = elffile.header['e_entry']
            for segment in elffile.iter_segments():
                if segment['p_type'] != 'PT_LOAD' or not segment['p_filesz']:
                    continue
                address = segment['p_paddr']
                if not (FLASH <= address and address + segment['p_filesz'] <= FLASH + self.flash_size):
                    raise ChipError(f"{elf}: a segment at {address:#x} ({segment['p_filesz']} bytes) is not in the "
                                    f"{self.flash_size}-byte flash")
                image[address:address + segment['p_filesz']] = segment.data()
            symbols = elffile.get_section_by_name('.symtab')
            ends = [s for s in symbols.iter_symbols() if s.name in ('_ebss', '__bss_end')] if symbols else []
            self.static_end = ends[0]['st_value'] if ends else SRAM
        for base in (FLASH, FLASH_ALIAS):
            self.uc.mem_map(base, self.flash_size, UC_PROT_READ | UC_PROT_EXEC)
            self.uc.mem_write(base, bytes(image))
        self.uc.mem_map(SRAM, max(self.sram_size, PAGE), UC_PROT_ALL)   # pages are 4 KB; 2 KB is checked below

    def _map_peripherals(self):
        # (base, offset -> name): every register the firmware may touch.
        blocks = {0x40021000: {0x00: 'RCC_CTLR', 0x04: 'RCC_CFGR0', 0x08: 'RCC_INTR', 0x0C: 'RCC_APB2PRSTR',
                               0x10: 'RCC_APB1PRSTR', 0x14: 'RCC_AHBPCENR', 0x18: 'RCC_APB2PCENR',
                               0x1C: 'RCC_APB1PCENR', 0x24: 'RCC_RSTSCKR'},
                  0x40022000: {0x00: 'FLASH_ACTLR'},
                  0xE0000000: {0xF4: 'DMDATA0', 0xF8: 'DMDATA1'},
                  0xE000F000: {0x00: 'STK_CTLR', 0x04: 'STK_SR', 0x08: 'STK_CNT', 0x0C: 'STK_CNTH', 0x10: 'STK_CMP',
                               0x14: 'STK_CMPH'}}
        for base, names in blocks.items():
            self.uc.mmio_map(base, PAGE, self._read, (base, names), self._write, (base, names))

    def _register(self, block, offset, access):
        base, names = block
        if offset & ~3 not in names:
            self._fail(f"{access} of {base + offset:#010x}, a peripheral register the firmware has no business with")
            return None
        return names[offset & ~3]

    def _read(self, uc, offset, size, names):
        name = self._register(names, offset, 'read')
        if name is None:
            return 0
        value = self.registers.get(name, 0x80 if name == 'DMDATA0' else 0)
        if name == 'RCC_CTLR':   # every oscillator and the PLL are ready as soon as they are on
            value |= ((value & 1) << 1) | ((value & (1 << 16)) << 1) | ((value & (1 << 24)) << 1)
        elif name == 'RCC_CFGR0':   # the clock switch status follows the switch
            value = (value & ~0xC) | ((value & 3) << 2)
        elif name == 'STK_CNT':
            value = self.instructions & 0xFFFFFFFF
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def _write(self, uc, offset, size, value, names):
        name = self._register(names, offset, 'write')
        if name is None:
            return
        shift = 8 * (offset & 3)
        mask = ((1 << (8 * size)) - 1) << shift
        value = (self.registers.get(name, 0) & ~mask) | ((value << shift) & mask)
        if name == 'DMDATA0':
            count = (value & 0x0F) - 4
            if value & 0x80 and count > 0:   # minichlink -T takes up to 7 characters and frees the mailbox
                data = (value >> 8).to_bytes(3, 'little') + self.registers.get('DMDATA1', 0).to_bytes(4, 'little')
                self.console.append(data[:count].decode('latin-1'))
            value = 0
        self.registers[name] = value

    # --- execution checks -----------------------------------------------------------------------
    def _hook(self):
        from unicorn import (UC_HOOK_CODE, UC_HOOK_MEM_FETCH_UNMAPPED, UC_HOOK_MEM_READ, UC_HOOK_MEM_READ_UNMAPPED,
                             UC_HOOK_MEM_WRITE, UC_HOOK_MEM_WRITE_UNMAPPED)
        from unicorn.riscv_const import UC_RISCV_REG_SP
        self.sp_register = UC_RISCV_REG_SP
        self.uc.hook_add(UC_HOOK_CODE, self._on_instruction)
        self.uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED,
                         self._on_unmapped)
        self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_flash_write, begin=FLASH, end=FLASH + self.flash_size - 1)
        self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_flash_write, begin=FLASH_ALIAS, end=FLASH_ALIAS + self.flash_size - 1)
        if self.sram_size < PAGE:
            self.uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._on_past_sram,
                             begin=SRAM + self.sram_size, end=SRAM + PAGE - 1)

    def _fail(self, message):
        if self.error is None:
            self.error = f"pc {self.pc:#010x}: {message}"
        self.uc.emu_stop()

    def _on_instruction(self, uc, address, size, _):
        self.pc = address
        self.instructions += 1
        if address == self.last:   # a jump to itself: the firmware has finished (or hangs on purpose)
            self.repeats += 1
            if self.repeats > 2:
                uc.emu_stop()
                return
        else:
            self.last, self.repeats = address, 0
        kind = self.checked.get(address)
        if kind is None:
            kind = m_extension(int.from_bytes(uc.mem_read(address, 4), 'little')) if size == 4 else ''
            self.checked[address] = kind or ''
        if (kind == 'mul' and not self.may_mul) or (kind == 'div' and not self.may_div):
            self._fail(f"a {kind} instruction ({int.from_bytes(uc.mem_read(address, 4), 'little'):#010x}): the "
                       f"{self.target} has no {'multiplier' if kind == 'mul' else 'divider'}")
        sp = uc.reg_read(self.sp_register)
        if not self.stack_set:   # from reset until the start-up code points sp into SRAM
            self.stack_set = SRAM < sp <= SRAM + self.sram_size
        elif sp < self.lowest_sp:
            self.lowest_sp = sp
            if sp < SRAM:
                self._fail(f"the stack pointer {sp:#010x} left SRAM (it starts at {SRAM:#010x})")
            elif sp < self.static_end:
                self._fail(f"the stack ran into static data (sp {sp:#010x}, static RAM ends at {self.static_end:#010x})")
        if self.instructions > MAX_INSTRUCTIONS:
            self._fail(f"no end after {MAX_INSTRUCTIONS} instructions")

    def _on_unmapped(self, uc, access, address, size, value, _):
        self._fail(f"access to unmapped address {address:#010x} ({size} bytes): nothing is there on the {self.target}")
        return False

    def _on_flash_write(self, uc, access, address, size, value, _):
        self._fail(f"write to flash at {address:#010x}")

    def _on_past_sram(self, uc, access, address, size, value, _):
        self._fail(f"access to {address:#010x}, past the {self.sram_size}-byte SRAM of the {self.target}")

    def run(self):
        from unicorn import UcError
        try:
            self.uc.emu_start(self.entry, FLASH + self.flash_size)
        except UcError as e:
            if self.error is None:
                self.error = f"pc {self.pc:#010x}: {e}"
        if self.error:
            raise ChipError(self.error)
        return ''.join(self.console)

    @property
    def stack_bytes(self):
        return SRAM + self.sram_size - self.lowest_sp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--elf', required=True, help='the image make flash writes (build/<chip>/firmware.elf)')
    parser.add_argument('--target', default='CH32V003', choices=list(CHIPS))
    args = parser.parse_args(argv)
    try:
        chip = Chip(args.elf, args.target)   # checks the ELF first
        console = chip.run()
    except FirmwareError as e:
        print(f"error: {args.target} (emulated chip, {Path(args.elf).name}): {e}", file=sys.stderr)
        return 2
    print(console, end='' if console.endswith('\n') else '\n')
    report = parse_report(console)
    print(f"{args.target} (emulated chip, the flashed image): {chip.instructions} instructions in all, peak stack "
          f"{chip.stack_bytes} of {chip.sram_size} bytes of SRAM"
          + (f", {report['mean']:.0f} instructions per inference" if report else ''))
    if report is None:
        print("error: the firmware printed no summary", file=sys.stderr)
        return 1
    if report['mismatches']:
        print(f"error: {report['mismatches']} predictions differ from the host's", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
