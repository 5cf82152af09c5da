"""Compare training runs on their validation accuracy: a table ranked by validation, and the curves.

    python docs/compare_runs.py runs/<run A> runs/<run B> ... [--plot docs/<name>.png] [--last 10]
    python docs/compare_runs.py docs/float_ceiling_runs/* --group 'p(int8|int32)s'   # seeds of a variant together

Each run is a folder written by training.py (runs/<name>/metrics.csv) of a config with
`validation_images` > 0. The ranking uses validation accuracy alone: the epoch keep_best keeps (the best
validation epoch, the earliest of equals) and the mean over the last `--last` epochs. The test accuracy of
that kept epoch is printed beside it to report, never to choose. `--group REGEX` adds a table of variants: the
runs whose names REGEX matches, grouped by its first group (or the whole match), with the mean and range of
their kept epochs' validation accuracy, and `--plot` then draws each variant's mean curve over its runs with
the band from the lowest to the highest of them.
"""
import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fileio import atomic_write  # noqa: E402
from training import best_epoch  # noqa: E402


class RunError(ValueError):
    """A run folder cannot be read; the message names it and says why."""


def read_history(run_dir):
    """The epochs of runs/<name>/metrics.csv as dicts of floats (epoch as int)."""
    path = Path(run_dir) / 'metrics.csv'
    if not path.is_file():
        raise RunError(f"{path} does not exist: pass the folder training.py writes for a run (runs/<name>)")
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RunError(f"{path} holds no epochs yet")
    if 'val_acc' not in rows[0]:
        raise RunError(f"{path} has no val_acc column: the run held out no validation images "
                       "(set validation_images, e.g. 5000, to compare runs honestly)")
    try:
        return [{key: int(value) if key == 'epoch' else float(value) for key, value in row.items() if value != ''}
                for row in rows]
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None


def summarize(name, history, last):
    best = best_epoch(history)   # the epoch keep_best keeps
    tail = history[-last:]
    return {'run': name, 'epochs': history[-1]['epoch'], 'best_epoch': best['epoch'], 'best_val': best['val_acc'],
            'mean_val_last': sum(m['val_acc'] for m in tail) / len(tail), 'test_at_best': best['test_acc']}


def table(rows, last):
    lines = [f"| run | epochs | kept epoch (best val) | val there | mean val, last {last} | test there (report) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['epochs']} | {r['best_epoch']} | {100 * r['best_val']:.2f} % | "
                     f"{100 * r['mean_val_last']:.2f} % | {100 * r['test_at_best']:.2f} % |")
    return '\n'.join(lines)


def group_names(names, pattern):
    """{variant: its run names}: runs grouped by what `pattern` matches in their names (its first group, or the
    whole match); a run it does not match is left out."""
    groups = {}
    for name in names:
        match = pattern.search(name)
        if match:
            groups.setdefault(match.group(1) if pattern.groups else match.group(0), []).append(name)
    if not groups:
        raise RunError(f"--group {pattern.pattern!r} matches none of the run names")
    return groups


def group_table(rows, pattern, last):
    """Per variant (group_names): the number of runs, the mean and range of their kept epochs' validation
    accuracy, the mean of their last `last` epochs, and the range of test accuracy at the kept epochs. Ranked by
    the mean kept validation."""
    by_name = {r['run']: r for r in rows}
    groups = {variant: [by_name[name] for name in names]
              for variant, names in group_names(list(by_name), pattern).items()}

    def mean(values):
        return 100 * sum(values) / len(values)

    def span(values):
        return f"{100 * min(values):.2f} – {100 * max(values):.2f} %"
    summaries = []   # (mean kept validation, the row's text)
    for name, members in groups.items():
        best = [r['best_val'] for r in members]
        summaries.append((mean(best), f"| {name} | {len(members)} | {mean(best):.2f} % | {span(best)} | "
                                      f"{mean([r['mean_val_last'] for r in members]):.2f} % | "
                                      f"{span([r['test_at_best'] for r in members])} |"))
    lines = [f"| variant | runs | kept val, mean | kept val, range | mean val, last {last} | test there (report) |",
             "|---|---|---|---|---|---|"]
    lines += [text for _, text in sorted(summaries, key=lambda s: -s[0])]
    return '\n'.join(lines)


def group_curves(histories, pattern):
    """{variant: (epochs, mean, lowest, highest)}: the validation accuracy (%) of a variant's runs epoch by epoch,
    over the epochs all of them reached."""
    curves = {}
    for variant, names in group_names(list(histories), pattern).items():
        epochs = min(len(histories[name]) for name in names)
        per_epoch = list(zip(*[[100 * m['val_acc'] for m in histories[name][:epochs]] for name in names]))
        curves[f"{variant} ({len(names)} run{'s' if len(names) > 1 else ''})"] = (
            [m['epoch'] for m in histories[names[0]][:epochs]], [sum(v) / len(v) for v in per_epoch],
            [min(v) for v in per_epoch], [max(v) for v in per_epoch])
    return curves


def plot(histories, path, pattern=None):
    """Each run's validation curve, or with `pattern` each variant's mean curve and the band of its runs."""
    import io
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if pattern is None:
        curves = {name: ([m['epoch'] for m in h], [100 * m['val_acc'] for m in h], None, None)
                  for name, h in histories.items()}
    else:
        curves = group_curves(histories, pattern)
    for name, (epochs, mean, lowest, highest) in curves.items():
        line, = ax.plot(epochs, mean, label=name, linewidth=1)
        if lowest is not None:   # one run: a band of no width
            ax.fill_between(epochs, lowest, highest, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation accuracy, PyTorch model (%)' + (', mean of runs' if pattern else ''))
    low = min(v for _, mean, lowest, _ in curves.values() for v in (lowest or mean)[len(mean) // 5:])
    ax.set_ylim(low - 0.05, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, metadata={'Software': None})
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='run folders (runs/<name>)')
    parser.add_argument('--plot', type=Path, help='write the validation curves to this PNG')
    parser.add_argument('--last', type=int, default=10, help='epochs averaged at the end of each run (default 10)')
    parser.add_argument('--group', metavar='REGEX',
                        help='also a table of variants: runs grouped by what REGEX matches in their names (its first '
                             'group, or the whole match), e.g. the runtag without the seed')
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error(f"--last {args.last}: must be at least 1")
    try:
        pattern = re.compile(args.group) if args.group is not None else None
    except re.error as e:
        parser.error(f"--group {args.group!r} is not a regular expression: {e}")
    try:
        histories = {Path(run).name: read_history(run) for run in args.runs}
        rows = sorted((summarize(name, h, args.last) for name, h in histories.items()),
                      key=lambda r: (-r['best_val'], -r['mean_val_last']))
        variants = group_table(rows, pattern, args.last) if pattern else None
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows, args.last))
    if variants:
        print()
        print(variants)
    if args.plot:
        plot(histories, args.plot, pattern)
        print(f"wrote {args.plot}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
