"""How much later one variant's training curve reaches a level than another's, seed by seed.

For each pair of variants of a seed study (bench/pretext_study.py or bench/finetune_flags_study.py with
--seeds; its <study>/seed<N>/results.json), the epoch at which a figure of the training batches
(perm_exact by default) first reaches each level, linearly interpolated between epoch ends, and the
second variant's minus the first's on each seed, their mean ± standard error (and the paired t-test's
p) and on how many seeds the second is later. A run's last figure hides a lag once the earlier run
levels off; the epoch at which a level is reached does not.

    python bench/curve_lag.py --study bench/results/cpu_resnet18_96x48_global_batch \\
        --pairs default:default+batch4x,default+lr0.2:default+batch4x_lr0.8
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tools import format_difference, publish  # noqa: E402  (study_tools puts the repository on the path)
import utils  # noqa: E402


def pairs_of(text):
    """'a:b,c:d' -> [('a', 'b'), ('c', 'd')] (argparse type of --pairs)."""
    pairs = [tuple(pair.split(':')) for pair in text.split(',')]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise argparse.ArgumentTypeError(f'expected earlier:later pairs separated by commas, got {text!r}')
    return pairs


def get_args_parser():
    parser = argparse.ArgumentParser(description="When each variant's training curve reaches a level, seed by seed")
    parser.add_argument('--study', required=True, help='a seed study folder (holding seed<N>/results.json)')
    parser.add_argument('--pairs', required=True, type=pairs_of,
                        help='earlier:later variant names, comma-separated; the lag is later minus earlier')
    parser.add_argument('--levels', default='0.05,0.1,0.2', type=lambda text: [float(level) for level in text.split(',')])
    parser.add_argument('--figure', default='perm_exact', help="the per-epoch training figure of the runs' history")
    parser.add_argument('--out', default=None, help='also write the table to this file')
    return parser


def crossing_epoch(curve, level):
    """The epochs trained when curve (one figure per epoch, at each epoch's end) first reaches level,
    linearly interpolated between epoch ends (1.0 if the first epoch already does); None if never."""
    for index, value in enumerate(curve):
        if value >= level:
            if index == 0:
                return 1.0
            return index + (level - curve[index - 1]) / (value - curve[index - 1])
    return None


def read_study(folder):
    """{seed: {variant name: result}} of a seed study's seed<N>/results.json files."""
    files = sorted(Path(folder).glob('seed*/results.json'), key=lambda path: int(path.parent.name[4:]))
    if not files:
        raise utils.UserError(f'--study {folder}: no seed<N>/results.json in it; give the --out folder of a '
                              'study run with --seeds.')
    return {int(path.parent.name[4:]): {result['name']: result for result in json.loads(path.read_text())}
            for path in files}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    study = read_study(args.study)
    for earlier, later in args.pairs:
        for seed, results in study.items():
            missing = [name for name in (earlier, later) if name not in results]
            if missing:
                raise utils.UserError(f'--pairs: no variant {missing[0]!r} in {args.study}/seed{seed}/results.json; '
                                      f'it holds {", ".join(results)}.')
    lines = [f'Epoch at which the training {args.figure} first reaches each level (interpolated between epoch '
             f'ends), later variant minus earlier, per seed ({", ".join(map(str, study))}) of {args.study}', '',
             '| later minus earlier | level | lag per seed (epochs) | mean ± se, p | later on |', '|---|---|---|---|---|']
    for earlier, later in args.pairs:
        for level in args.levels:
            lags = []
            for results in study.values():
                reached = [crossing_epoch([epoch[args.figure] for epoch in results[name].get('history', [])], level)
                           for name in (earlier, later)]
                lags.append(None if None in reached else reached[1] - reached[0])
            measured = [lag for lag in lags if lag is not None]
            cells = ' / '.join('-' if lag is None else f'{lag:+.2f}' for lag in lags)
            summary, later_on = '-', '-'
            if len(measured) > 1:
                summary = format_difference(measured, 2)
            if measured:
                later_on = f'{sum(lag > 0 for lag in measured)} of {len(measured)}'
            lines.append(f'| {later} minus {earlier} | {level:g} | {cells} | {summary} | {later_on} |')
    lines += ['', "'-': a run that failed or never reached the level; se: sd of the lags / sqrt(seeds); p: the "
              "two-sided paired t-test's (none where the lags are all equal)."]
    publish('\n'.join(lines), args.out)
    return lines


if __name__ == '__main__':
    utils.run_main(main)
