"""Instructions per inference, layer by layer, of the image a user flashes, on the emulated chip.

    python bench/mcu_layers.py --checkpoint modeldata/zoo_....pth [--target CH32V003] [--ch32fun PATH]
    python bench/mcu_layers.py --quick        # the original BitNetMCU's FC checkpoint from ../shared
    python bench/mcu_layers.py --elf mcu/build/CH32V003/firmware.elf      # an image built already (kernels
                                                                            # called once may be inside main)

The flashed image (make firmware, ch32fun) runs its test images on mcu/chipsim.py (Unicorn, the chip's
memory map). Every instruction executed inside a kernel is charged to the call that entered it, so each
call site is one row: a layer (the convolutions of every channel share their rows), requantization, pooling.
"""
import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chips  # noqa: E402
import pipeline  # noqa: E402
from chips import CHIPS, parse_report  # noqa: E402
from mcu import chipsim  # noqa: E402

DEFAULT_CH32FUN = ROOT.parent / 'shared' / 'ch32fun' / 'ch32fun'


def functions(elf):
    """(start, end, name) of every function symbol, sorted."""
    from elftools.elf.elffile import ELFFile
    with open(elf, 'rb') as f:
        table = ELFFile(f).get_section_by_name('.symtab')
        return sorted((s['st_value'], s['st_value'] + s['st_size'], s.name) for s in table.iter_symbols()
                      if s['st_info']['type'] == 'STT_FUNC' and s['st_size'])


def profile(elf, target):
    """{(call site, kernel): instructions} over the whole run, and the number of inferences. A kernel is a
    BitNetMCU_* function; its call site is the return address when it is entered. Everything it runs,
    static helpers included, is charged to that call. Instructions of main() and the rest of the firmware
    are 'outside'."""
    from unicorn import UC_HOOK_CODE
    from unicorn.riscv_const import UC_RISCV_REG_RA
    spans = functions(elf)
    starts = {lo: name for lo, _, name in spans if name.startswith('BitNetMCU_')}
    infer = next(((lo, hi) for lo, hi, name in spans if name == 'BitNetMCU_model_infer'), (0, 0))
    firmware_own = [(lo, hi) for lo, hi, name in spans if not name.startswith('BitNetMCU_') and
                    name in ('main', 'print', 'print_number', 'putchar', 'measure_stack', 'report_trap')]
    chip = chipsim.Chip(elf, target)
    counts, state = collections.Counter(), {'site': None}

    def on_instruction(uc, address, size, _):
        name = starts.get(address)
        if name == 'BitNetMCU_model_infer' or (name is None and infer[0] <= address < infer[1]):
            state['site'] = (infer[0], 'BitNetMCU_model_infer itself')   # with any kernel inlined into it
        elif name is not None and not name.startswith('BitNetMCU_unpack'):
            state['site'] = (uc.reg_read(UC_RISCV_REG_RA), name)
        elif any(lo <= address < hi for lo, hi in firmware_own):
            state['site'] = None
        counts[state['site'] or 'outside'] += 1
    chip.uc.hook_add(UC_HOOK_CODE, on_instruction)
    console = chip.run()
    summary = parse_report(console)
    if summary is None or summary['mismatches']:
        raise SystemExit(f"error: the firmware did not finish cleanly:\n{console[-1000:]}")
    return counts, summary['images']


def report(counts, images):
    rows = sorted((site, n) for site, n in counts.items() if site != 'outside')   # code order: layer order
    kernels = sum(n for _, n in rows)
    print(f"{'#':>2s} {'kernel':34s} {'per inference':>14s} {'share':>6s}")
    for i, ((_, name), n) in enumerate(rows):
        print(f"{i:2d} {name.split('.')[0]:34s} {n / images:14,.0f} {n / kernels:6.1%}")   # no GCC clone suffix
    print(f"   {'all kernels':34s} {kernels / images:14,.0f}   ({images} images; the firmware's own loop, "
          f"{counts['outside'] / images:,.0f} per image, not counted)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='export it, verify it, build its flashed image, profile it')
    source.add_argument('--elf', help='a flashed image built by make firmware')
    source.add_argument('--quick', action='store_true', help="seconds: the original BitNetMCU's 4bitsym checkpoint")
    parser.add_argument('--target', default='CH32V003', choices=list(CHIPS))
    parser.add_argument('--ch32fun', default=str(DEFAULT_CH32FUN), help='the ch32fun SDK (default: %(default)s)')
    args = parser.parse_args()
    if args.quick:
        args.checkpoint = str(ROOT.parent / 'shared' / 'original-checkpoints' / 'fc_4bitsym_64_64_64_v02.pth')
    with tempfile.TemporaryDirectory() as tmp:
        elf = args.elf
        if args.checkpoint:
            from dataset import load_dataset
            if not Path(args.ch32fun).is_dir():
                sys.exit(f"error: no ch32fun SDK at {args.ch32fun}; pass --ch32fun <clone>/ch32fun")
            work = Path(tmp)
            pipeline.measure_model(args.checkpoint, work, load_dataset('MNIST', log=lambda *a: None), targets=(),
                                   images=100)
            # Built like the flashed image, except that kernels called once stay functions of their own (LTO
            # would fold them into main, where no call site separates them).
            out = chips.make(args.target, work / 'model.h', work / 'test.bin', work / args.target, 'firmware',
                                f'CH32FUN={Path(args.ch32fun).resolve()}',
                                'PROFILE_CFLAGS=-fno-inline-functions-called-once')
            if out.returncode:
                sys.exit(f"error: make firmware failed:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
            elf = work / args.target / 'firmware.elf'
        report(*profile(elf, args.target))


if __name__ == '__main__':
    main()
