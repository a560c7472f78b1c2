"""The pretext study's table and plot for train.py runs made outside bench/pretext_study.py, such as
those of bench/gpu_session.sh, which stop at a time limit and are judged by test.py on their last
saved weights. Each run is named by the pretext-study variant whose flags it used, and read back from
its train.py log and the output of test.py:

    python bench/runs_table.py --out bench/results/gpu_h200_resnet50_288x144 --setting 'resnet50, ...' \\
        default=fp32/RUN.log,fp32.test.txt default+fast=amp/RUN.log,amp.test.txt

writes table.md and curves.png (the pretext study's formats) and results.json into --out. Runs named
VARIANT.seedN (default.seed0=... default.seed1=... default+fast.seed0=...) are also tabulated as the
pretext study's --seeds does it, in seeds.md and seeds.png: each variant over the seeds, and its
difference from the first variant seed by seed (a run missing for a seed counts as failed there).
"""
import argparse
import json
import re
import sys
from pathlib import Path

import pretext_study
from study_tools import read_history

TEST_LINES = {'exact': re.compile(r'permutation recovery, (\w+) \(\d+ images\): exact ([\d.]+)% .*per stripe ([\d.]+)%'),
              'retrieval': re.compile(r'Rank-1: ([\d.]+)% .*mAP: ([\d.]+)%')}


def read_test(test_output):
    """test.py's figures, as fractions: permutation recovery on all test images (its 'both' line) and the
    zero-shot retrieval."""
    text = Path(test_output).read_text()
    recovery = {modality: (float(exact) / 100, float(stripe) / 100)
                for modality, exact, stripe in TEST_LINES['exact'].findall(text)}
    retrieval = TEST_LINES['retrieval'].search(text)
    if 'both' not in recovery or retrieval is None:
        raise ValueError(f'{test_output} has no permutation-recovery or retrieval line: is it the output of test.py?')
    exact, stripe = recovery['both']
    return {'perm_exact': exact, 'perm_stripe': stripe,
            'rank1': float(retrieval.group(1)) / 100, 'mAP': float(retrieval.group(2)) / 100}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--setting', required=True, help='the table\'s setting line (size, device)')
    parser.add_argument('runs', nargs='+', help='VARIANT=TRAIN_LOG,TEST_OUTPUT or VARIANT.seedN=TRAIN_LOG,TEST_OUTPUT')
    args = parser.parse_args(argv)
    results, seeds = [], []
    for run in args.runs:
        name, _, files = run.partition('=')
        variant, marked, seed = name.partition('.seed')
        if (variant not in pretext_study.VARIANTS or files.count(',') != 1
                or marked and not seed.isdigit() or seeds and bool(marked) != (seeds[0] is not None)):
            sys.exit(f'error: {run!r} is not VARIANT=TRAIN_LOG,TEST_OUTPUT (or, for every run, '
                     'VARIANT.seedN=TRAIN_LOG,TEST_OUTPUT) with a variant of bench/pretext_study.py')
        seeds.append(int(seed) if marked else None)
        log_file, test_output = files.split(',')
        try:
            history, test = read_history(log_file), read_test(test_output)
        except (OSError, ValueError) as error:  # a missing or foreign file: one sentence, no traceback
            sys.exit(f'error: {error}')
        results.append({'name': name, 'variant': variant, 'flags': pretext_study.variant_flags(variant),
                        'history': history, 'test': test, 'seconds': sum(epoch['seconds'] for epoch in history)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    pretext_study.write_table(results, out / 'table.md', args.setting)
    pretext_study.plot_curves(results, out / 'curves.png')
    print((out / 'table.md').read_text())
    if seeds[0] is not None:
        write_seeds(results, seeds, out, args.setting)


def write_seeds(results, seeds, out, setting):
    """seeds.md and seeds.png of runs named VARIANT.seedN: by_seed as the pretext study's --seeds makes it,
    every variant in the order of its first run, in every seed."""
    variants = list(dict.fromkeys(result['variant'] for result in results))
    runs = {(result['variant'], seed): dict(result, name=result['variant']) for result, seed in zip(results, seeds)}
    by_seed = {seed: [runs.get((variant, seed), {'name': variant, 'error': 'no run given'}) for variant in variants]
               for seed in sorted(set(seeds))}
    pretext_study.write_seed_study(by_seed, out / 'seeds', setting + f', seeds {", ".join(map(str, by_seed))}')


if __name__ == '__main__':
    main()
