"""One pretext-study variant as several runs of bench/pretext_study.py --seeds gave it (made by two
commits of the code, or on two machines), side by side: the seed table and plot of the pretext study,
each study folder a row, its difference from the first row taken seed by seed.

    python bench/compare_studies.py --out bench/results/cpu_resnet18_96x48_sinkhorn_log_softmax_avx2 \\
        'logsumexp (32122df)=bench/results/cpu_resnet18_96x48_default_avx2' \\
        'log_softmax=bench/results/cpu_resnet18_96x48_sinkhorn_log_softmax_avx2'

reads <folder>/seed<N>/results.json for the seeds every folder has and writes compared.md and
compared.png into --out.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretext_study  # noqa: E402
import utils  # noqa: E402


def labelled_folder(text):
    """'label=folder' -> (label, Path(folder)) (argparse type of the studies)."""
    label, separator, folder = text.partition('=')
    if not separator or not label or not folder:
        raise argparse.ArgumentTypeError(f'expected label=folder, got {text!r}')
    return label, Path(folder)


def seeds_of(folder):
    return {int(match.group(1)) for path in folder.glob('seed*/results.json')
            if (match := re.fullmatch(r'seed(\d+)', path.parent.name))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('studies', nargs='+', type=labelled_folder, help='label=folder of a pretext study with --seeds')
    parser.add_argument('--variant', default='default', help='the variant compared')
    parser.add_argument('--out', required=True, help='folder of compared.md and compared.png')
    args = parser.parse_args(argv)
    found = [seeds_of(folder) for _, folder in args.studies]
    for (label, folder), seeds in zip(args.studies, found):
        if not seeds:
            raise utils.UserError(f'{folder} ({label}) holds no seed<N>/results.json: give the --out folder of a '
                                  'pretext study run with --seeds.')
    seeds = sorted(set.intersection(*found))
    if not seeds:
        raise utils.UserError('the studies share no seed: run them with the same --seeds.')
    by_seed = {}
    for seed in seeds:
        by_seed[seed] = []
        for label, folder in args.studies:
            results = {result['name']: result
                       for result in json.loads((folder / f'seed{seed}' / 'results.json').read_text())}
            if args.variant not in results:
                raise utils.UserError(f'{folder}/seed{seed} has no run of the variant {args.variant}.')
            by_seed[seed].append({**results[args.variant], 'name': label})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretext_study.write_seed_study(by_seed, out / 'compared', f'the variant {args.variant} of the pretext study, '
                                   f'seeds {", ".join(map(str, seeds))}: '
                                   + ', '.join(f'{label} = {folder}' for label, folder in args.studies))
    return by_seed


if __name__ == '__main__':
    utils.run_main(main)
