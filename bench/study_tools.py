"""What the study scripts of bench/ share: running named variants side by side in worker processes,
each with its console output in a file, and keeping their results across invocations; a run under
torchrun and its figures read back from its log; the table and plot of a study run over several seeds.

A study script defines `run(name, args) -> dict` (a module-level function, so that spawned workers
can import it) and calls run_variants, which trains only the names not yet in results.json.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def quietly(log_file, function, *arguments):
    """function(*arguments) with its console output, and the traceback of what it raises, sent to log_file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, 'w') as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return function(*arguments)
        except BaseException:
            traceback.print_exc()
            raise


# Options of a variant that are the study's, not the training script's: how the run is launched, with
# the images of an epoch (and so of the run) left those of the study's setting:
#   --batch_scale K       K times the study's --batch-size in one process, so K times fewer steps an epoch
#   --nproc_per_node N    under torchrun with N processes (gloo on the CPU; the study's --threads shared
#                         among them), each with the study's --batch-size and N times fewer steps an epoch
LAUNCH_OPTIONS = ('--batch_scale', '--nproc_per_node')


def split_launch_options(extra):
    """(a variant's flags without the LAUNCH_OPTIONS and their values, {option: integer})."""
    flags, options, rest = [], {}, list(extra)
    while rest:
        flag = rest.pop(0)
        if flag in LAUNCH_OPTIONS:
            options[flag] = int(rest.pop(0))
        else:
            flags.append(flag)
    return flags, options


def train_run(script, main, argv, processes, threads, log_file, run_log):
    """The per-epoch history of a training script: main(argv) in this process, its console output in
    log_file; or, with processes > 1, the script under torchrun (its output in log_file), the history
    read back from the run's own log, run_log (a function that finds it once the run is done)."""
    if processes == 1:
        return quietly(log_file, main, argv)
    torchrun(script, argv, processes, threads, log_file)
    return read_history(run_log())


def torchrun(script, argv, processes, threads, log_file):
    """Run a script of the repository under torchrun with `processes` processes on this machine (gloo on
    the CPU, one GPU each on GPUs), the `threads` torch threads shared among them, its console output in
    log_file; raises when it fails. Its figures are read back from its log (read_history)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes),
               str(REPO_ROOT / script), *argv]
    with open(log_file, 'w') as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, 'OMP_NUM_THREADS': str(max(1, threads // processes))})
    if finished.returncode:
        raise RuntimeError(f'torchrun {script} with {processes} processes exited with status {finished.returncode}: '
                           f'see {log_file}')


# The line engine.fit logs at the end of each epoch.
EPOCH_LINE = re.compile(r'^epoch (\d+) lr \S+ (.*) \((\d+) steps, ([\d.]+) img/s, ([\d:]+)\)$')


def read_history(log_file):
    """Per-epoch figures of a train.py log, as train.main returns them (only the logged four decimals):
    a list of dicts with 'epoch', 'steps', 'seconds', 'images_per_second' (of all processes) and every loss
    and accuracy of the epoch line."""
    history, steps = [], 0
    for line in Path(log_file).read_text().splitlines():
        match = EPOCH_LINE.match(line)
        if match is None:
            continue
        epoch, figures, epoch_steps, images_per_second, clock = match.groups()
        names_and_values = figures.split()
        steps += int(epoch_steps)
        seconds = sum(int(part) * 60 ** power for power, part in enumerate(reversed(clock.split(':'))))
        history.append({'epoch': int(epoch), 'steps': steps, 'seconds': seconds,
                        'images_per_second': float(images_per_second),
                        **{name: float(value) for name, value in zip(names_and_values[::2], names_and_values[1::2])}})
    if not history:
        raise ValueError(f'{log_file} has no epoch lines: is it the log of a train.py run?')
    return history


def run_variants(run, names, seed_runs, order, summary):
    """{seed: results of `names` (dicts with a 'name', and an 'error' for a failed run), in that order}
    for each (seed, args) of seed_runs (over_seeds).

    Names already in a seed's <args.out>/results.json without an error are taken from it; the others,
    of every seed, run as run(name, args) in one pool, args.jobs at a time in spawned processes (so a
    study that adds one variant to several seeds keeps every job busy). A seed's results.json is
    rewritten after each of its runs with everything known so far, in the order of `order`;
    summary(result) is printed for each new result.
    """
    done, futures = {}, {}
    with ProcessPoolExecutor(max_workers=seed_runs[0][1].jobs, mp_context=get_context('spawn')) as pool:
        for seed, args in seed_runs:
            results_file = Path(args.out) / 'results.json'
            results_file.parent.mkdir(parents=True, exist_ok=True)
            known = json.loads(results_file.read_text()) if results_file.is_file() else []
            done[seed] = {result['name']: result for result in known}
            todo = [name for name in names if name not in done[seed] or 'error' in done[seed][name]]
            print(f'{len(todo)} run(s) to do, {len(names) - len(todo)} already in {results_file}', flush=True)
            futures.update({(seed, name): (results_file, pool.submit(run, name, args)) for name in todo})
        for (seed, name), (results_file, future) in futures.items():
            result = done[seed][name] = future.result()
            print(f'{name}{f" (seed {seed})" if len(seed_runs) > 1 else ""}: {result.get("error") or summary(result)}',
                  flush=True)
            ordered = [key for key in order if key in done[seed]] + [key for key in done[seed] if key not in order]
            results_file.write_text(json.dumps([done[seed][key] for key in ordered], indent=1))
    return {seed: [done[seed][name] for name in names] for seed, _ in seed_runs}


def chosen_variants(text, variants):
    """The variant names of --variants ('all', or comma-separated names of `variants`), in that order;
    an unknown name stops the study with one sentence."""
    names = list(variants) if text == 'all' else [name.strip() for name in text.split(',')]
    unknown = [name for name in names if name not in variants]
    if unknown:
        sys.exit(f'error: --variants: unknown variant(s) {unknown}: choose from {list(variants)}')
    return names


def over_seeds(args):
    """[(seed, the study's args for it)]: with --seeds (comma-separated), each seed with its results in
    <args.out>/seed<N>/; without, args.seed with its results in args.out."""
    if not args.seeds:
        return [(args.seed, args)]
    try:
        seeds = [int(seed) for seed in args.seeds.split(',')]
    except ValueError:
        sys.exit(f'error: --seeds {args.seeds!r} is not a comma-separated list of integers such as 0,1,2')
    return [(seed, argparse.Namespace(**{**vars(args), 'seed': seed, 'out': str(Path(args.out) / f'seed{seed}')}))
            for seed in seeds]


def publish(report, out=None):
    """Print a Markdown report and, with `out`, also write it to that file (its folder made)."""
    print('\n' + report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report + '\n')


def device_label(args):
    """Where the runs went, for a table's setting line."""
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {args.threads} thread(s) per job'
    return f'{device}, {args.jobs} job(s) at once'


def mean_and_sd(values):
    """Mean and sample standard deviation of a list of numbers (sd 0 for one number)."""
    mean = sum(values) / len(values)
    spread = sum((value - mean) ** 2 for value in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, spread ** 0.5


def paired_difference(differences):
    """Mean, standard error and two-sided paired t-test p-value of seed-by-seed differences (p None when it
    is undefined: one seed, or differences all equal). With few seeds the t distribution's tails are wide:
    four seeds 2.7 standard errors apart give p 0.07."""
    from scipy import stats
    mean, sd = mean_and_sd(differences)
    error = sd / len(differences) ** 0.5
    p = float(2 * stats.t.sf(abs(mean) / error, len(differences) - 1)) if error > 0 else None
    return mean, error, p


def format_difference(differences, decimals):
    """'+1.2 ± 0.5, p 0.04': paired_difference of seed-by-seed differences, as the tables show it."""
    mean, error, p = paired_difference(differences)
    return f'{mean:+.{decimals}f} ± {error:.{decimals}f}' + (f', p {p:.2g}' if p is not None else '')


def write_seed_table(by_seed, path, setting, figures, notes=()):
    """The spread of a study run once per seed, and how far each variant differs from the first beyond it.

    by_seed: {seed: [one result per variant, in the same order for every seed]} (dicts with a 'name',
    and an 'error' for a failed run); figures: {column title: (function(result) -> number, decimals)}.
    One row per variant: its first figure seed by seed, then per figure the mean ± sample sd over the
    seeds and, after the first variant, its difference from the first variant on the same seeds (mean
    ± standard error of that mean, and the paired t-test's p). Failed runs are named under the table and
    left out of the figures; `notes`, lines of text, close the file.
    """
    seeds = list(by_seed)
    names = [result['name'] for result in by_seed[seeds[0]]]
    runs = {(name, seed): result for seed in seeds for name, result in zip(names, by_seed[seed])}
    ok = {key: result for key, result in runs.items() if 'error' not in result}
    (first_title, (first, first_decimals)), reference = next(iter(figures.items())), names[0]
    lines = [f'Setting: {setting}', '',
             f'| variant | {first_title}, seed {" / ".join(map(str, seeds))} | '
             + ' | '.join(f'{title}: mean ± sd (minus {reference})' for title in figures) + ' |',
             '|---|---|' + '---|' * len(figures)]
    for name in names:
        done = [seed for seed in seeds if (name, seed) in ok]
        paired = [seed for seed in done if (reference, seed) in ok] if name != reference else []
        cells = [' / '.join(f'{first(ok[name, seed]):.{first_decimals}f}' if (name, seed) in ok else 'failed'
                            for seed in seeds)]
        for figure, decimals in figures.values():
            if not done:
                cells.append('-')
                continue
            mean, sd = mean_and_sd([figure(ok[name, seed]) for seed in done])
            cell = f'{mean:.{decimals}f} ± {sd:.{decimals}f}' + (f' (n={len(done)})' if len(done) < len(seeds) else '')
            if paired:
                differences = [figure(ok[name, seed]) - figure(ok[reference, seed]) for seed in paired]
                cell += f' ({format_difference(differences, decimals)})'
            cells.append(cell)
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'sd: sample standard deviation over the seeds. In brackets: the variant minus {reference} on the '
              'same seed, mean over the seeds ± its standard error (sd of the differences / sqrt(seeds)), and the '
              'two-sided paired t-test\'s p (t distribution with seeds - 1 degrees of freedom; none where the '
              'differences are all equal), computed on the unrounded figures: a difference the table rounds to '
              'zero can have a small p when it has the same sign on every seed.']
    lines += [f'- {name}, seed {seed} failed: {result["error"]}'
              for (name, seed), result in runs.items() if 'error' in result]
    lines += list(notes)
    path.write_text('\n'.join(lines) + '\n')


def plot_seeds(by_seed, path, curve_key, curve_title, final, final_title, final_reference=None):
    """Left: each variant's history[curve_key] against the epochs trained (the same images for every
    variant, whatever its batch), the mean over the seeds with the lowest and highest seed as a band;
    right: final(result), one dot per seed, the mean as a bar, and final_reference, a (value, label)
    pair such as a chance level, as a dashed line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    seeds = list(by_seed)
    names = [result['name'] for result in by_seed[seeds[0]]]
    colours = plt.get_cmap('tab10').colors
    figure, (curves, dots) = plt.subplots(1, 2, figsize=(14, 5))
    for index, name in enumerate(names):
        results = [by_seed[seed][index] for seed in seeds if 'error' not in by_seed[seed][index]]
        if not results:
            continue
        colour = colours[index % 10]
        length = min(len(result['history']) for result in results)
        epochs = [epoch['epoch'] + 1 for epoch in results[0]['history'][:length]]
        values = [[result['history'][epoch][curve_key] for result in results] for epoch in range(length)]
        curves.plot(epochs, [sum(epoch) / len(epoch) for epoch in values], color=colour, label=name)
        curves.fill_between(epochs, [min(epoch) for epoch in values], [max(epoch) for epoch in values],
                            color=colour, alpha=0.15)
        finals = [final(result) for result in results]
        dots.scatter([index] * len(finals), finals, color=colour)
        dots.hlines(sum(finals) / len(finals), index - 0.25, index + 0.25, color=colour)
    curves.set_title(f'{curve_title}: mean and range over {len(seeds)} seeds', fontsize=10)
    curves.set_xlabel('epochs')
    curves.legend(fontsize=8)
    if final_reference is not None:
        dots.axhline(final_reference[0], color='black', linestyle='--', linewidth=0.8, label=final_reference[1])
        dots.legend(fontsize=8)
    dots.set_title(f'{final_title}: one dot per seed', fontsize=10)
    dots.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    for axis in (curves, dots):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
