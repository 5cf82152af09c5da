"""Run and measure the BitNetMCU firmware: emulated runs, memory fit, multiplier-free check.

    python firmware.py sim   --elf E --blob B --target CH32V003      # QEMU, all images in the blob
    python firmware.py size  --elf FLASH_ELF --sim-elf E --blob B    # flash/RAM use and peak stack
    python firmware.py nomul --elf E                                 # no mul/div, no libgcc multiply

Called by mcu/Makefile (make sim / size / nomul / image); the work is chips.py's (pipeline.py holds the
whole chain for one checkpoint, measure_model).
"""
import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the top level: chips.py
from chips import (CHIPS, MULTIPLY, FirmwareError, fit_problem, forbidden_arithmetic, multiply_uses,  # noqa: E402
                   peak_stack, run_qemu, section_sizes)
from mcu import chipsim  # noqa: E402
from testdata import StaleDataError  # noqa: E402


def report_image(args):
    """The flashable image against the chip: flash and static RAM (and with --elf the stack the demo needs,
    measured by running it on the emulated chip); one line and exit status 1 when it does not fit."""
    flash_max, ram_max = CHIPS[args.target].flash, CHIPS[args.target].ram
    flash, ram = section_sizes(args.probe_elf or args.elf)
    stack = 0
    if args.elf:
        chip = chipsim.Chip(args.elf, args.target)
        chip.run()
        stack = chip.stack_bytes
    problem = fit_problem(args.target, flash, ram, stack)
    if problem:
        print(f"{args.target}: the image does not fit: {problem}", file=sys.stderr)
        return 1
    if args.elf:
        print(f"{args.target} image {args.elf}: flash {flash} of {flash_max} bytes ({flash_max - flash} free), "
              f"RAM {ram} static + {stack} stack (measured on the emulated chip) = {ram + stack} of {ram_max} bytes")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=['sim', 'size', 'nomul', 'image'])
    parser.add_argument('--elf', help='firmware ELF (emulator build for sim, chip build otherwise)')
    parser.add_argument('--sim-elf', help='size: the emulator build, run once to measure the stack')
    parser.add_argument('--blob', help='test-data blob written by test_inference.py')
    parser.add_argument('--header', help='the model header the firmware was built with (the blob must belong to it)')
    parser.add_argument('--probe-elf', help='the chip build linked without limits: sim notes and image says how far '
                                            'it is over the chip')
    parser.add_argument('--target', default='CH32V003', choices=list(CHIPS))
    parser.add_argument('--note-only', action='store_true',
                        help='nomul: print a note instead of failing (multiplies the chip does in software)')
    parser.add_argument('--timeout', type=int, default=600)
    args = parser.parse_args(argv)
    needs = {'sim': ['elf', 'blob'], 'size': ['elf', 'sim_elf', 'blob'], 'nomul': ['elf'],
             'image': []}[args.command]
    missing = [f"--{name.replace('_', '-')}" for name in needs if getattr(args, name) is None]
    if args.command == 'image' and not (args.elf or args.probe_elf):
        missing.append('--elf or --probe-elf')
    if missing:
        print(f"error: firmware.py {args.command} needs {' and '.join(missing)} (see --help)", file=sys.stderr)
        return 2
    try:
        if args.command == 'sim':
            r = run_qemu(args.elf, args.blob, args.target, args.timeout, args.header)
            print(f"{args.target} (emulated, {Path(args.elf).name}): {r['images']} images, "
                  f"accuracy {100 * r['correct'] / r['images']:.2f}%, {r['mismatches']} mismatches against the host")
            print(f"instructions per inference: mean {r['mean']:.0f}, min {r['min']}, max {r['max']}; "
                  f"peak stack {r['stack']} bytes")
            if args.probe_elf:
                problem = fit_problem(args.target, *section_sizes(args.probe_elf), r['stack'])
                if problem:
                    print(f"note: this model does not fit the {args.target}: {problem} (make size)")
            if r['mismatches'] or r['status'] != 0:
                return 1
        elif args.command == 'size':
            flash_max, ram_max = CHIPS[args.target].flash, CHIPS[args.target].ram
            flash, ram = section_sizes(args.elf)
            stack = peak_stack(args.sim_elf, args.blob, args.target, args.timeout)
            problem = fit_problem(args.target, flash, ram, stack)
            print(f"{args.target}: flash {flash} of {flash_max} bytes, RAM {ram} static + {stack} peak stack "
                  f"= {ram + stack} of {ram_max} bytes: " + (f"DOES NOT FIT: {problem}" if problem else 'fits'))
            if problem:
                return 1
        elif args.command == 'nomul':
            uses = forbidden_arithmetic(args.elf, args.target)
            what = 'multiply/divide' if args.target == 'CH32V003' else 'divide'
            if uses and args.note_only:
                print(f"note: {len(uses)} {what} uses: this model multiplies in software on the {args.target} "
                      "(libgcc; correct, but slow)")
            elif uses:
                print(f"{args.elf}: {len(uses)} {what} uses the {args.target} cannot run:\n  " + '\n  '.join(uses[:20]))
                return 1
            print(f"{args.elf}: no mul/div instruction, no libgcc multiply or divide" if args.target == 'CH32V003'
                  else f"{args.elf}: no div/rem instruction, no libgcc divide ({len(multiply_uses(args.elf, MULTIPLY))} "
                       "hardware multiplies)")
        else:
            return report_image(args)
    except (FirmwareError, StaleDataError, subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
