"""Do the speed flags change what AGW or DDAG fine-tuning learns? One method fine-tuned from random
weights with the scripts' defaults and with the speed flags, each over several seeds, side by side.

Each variant is a set of flags added to the method's command (AGW: --method agw; DDAG: --wpa --graph),
or a larger global batch over the same images, in one process or under torchrun (LAUNCH_OPTIONS of
study_tools).
A run's figures: the training loss and identity accuracy of its last epoch, and the retrieval of its
last epoch's weights judged by the method's test script (10 gallery draws averaged; the feature that
picks the best checkpoint: FC for AGW, the attention feature for DDAG), once on the held-out test
identities and once on the training identities (a view of the data set, <out>/training_ids/, whose
test list names them: how well the network matches the infrared and visible images of the people it
learnt). At the CPU size below, on the default synthetic set (12 test identities), the retrieval of
unseen identities is not far above chance, and the training curves and the training identities are
the sharper measurements. --rejudge judges the last weights of the runs already done again, without
training (after a change to the judging).

    python bench/finetune_flags_study.py --method agw --out bench/results/agw_flags --seeds 0,1,2 --jobs 2

The folder --out receives seed<N>/results.json with each run's per-epoch history and figures (its
files in seed<N>/<variant>/, its console output and the test script's in seed<N>/logs/), seeds.md
(the variants over the seeds, each one's difference from the first on the same seed, and the chance
level of the retrieval figures) and seeds.png (training loss against epochs, final mAP per seed).
"""
import argparse
import json
import shutil
import time
from pathlib import Path

from study_tools import (chosen_variants, device_label, over_seeds, plot_seeds, quietly, run_variants,
                         split_launch_options, train_run, write_seed_table)

VARIANTS = {
    'defaults': (),
    'amp': ('--amp', '--channels_last'),
    'device_augment': ('--augment', 'device'),
    'fast': ('--amp', '--channels_last', '--augment', 'device'),
    'channels_last': ('--channels_last',),  # fp32: the memory format alone
    # twice the global batch over the same images (study_tools.LAUNCH_OPTIONS), with the learning rate
    # scaled linearly (the README's rule for torchrun) or not, in one process and under torchrun
    'batch2x': ('--batch_scale', '2', '--lr', '0.2'),
    'batch2x_lr0.1': ('--batch_scale', '2'),
    'torchrun2': ('--nproc_per_node', '2', '--lr', '0.2'),
    'torchrun2_lr0.1': ('--nproc_per_node', '2'),
    'batch4x': ('--batch_scale', '4', '--lr', '0.4'),
    # ... with batch norm over groups of the study's batch, as each of torchrun's processes has it
    'batch2x_ghostbn2': ('--batch_scale', '2', '--lr', '0.2', '--ghost_bn', '2'),
    'batch4x_ghostbn4': ('--batch_scale', '4', '--lr', '0.4', '--ghost_bn', '4'),
    # ... and as torchrun's two processes would, in one: two batches of the study's size a step
    'accum2': ('--accum_iter', '2', '--lr', '0.2'),
}
SCRIPTS = {'agw': 'AGW/train.py', 'ddag': 'DDAG/train_ddag.py'}
METHODS = {'agw': ('--method', 'agw'), 'ddag': ('--wpa', '--graph')}
SELECTED = {'agw': 'fc', 'ddag': 'att'}  # the feature each script picks its best checkpoint by
FIGURES = {'**mAP** (%)': (lambda result: 100 * result['test']['mAP'], 1),
           'Rank-1 (%)': (lambda result: 100 * result['test']['rank1'], 1),
           'training identities: mAP (%)': (lambda result: 100 * result['seen']['mAP'], 1),
           'train accuracy, last epoch (%)': (lambda result: 100 * result['history'][-1]['accuracy'], 1),
           'train loss, last epoch': (lambda result: result['history'][-1]['loss'], 3)}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--method', required=True, choices=list(METHODS))
    parser.add_argument('--out', required=True, help='folder for the results, the table and the plot')
    parser.add_argument('--variants', default='all', help=f'comma-separated, or all: {", ".join(VARIANTS)}')
    parser.add_argument('--data_path', default=None, help='a synthetic set (default: the generated one)')
    parser.add_argument('--arch', default='resnet18')
    parser.add_argument('--img_h', default=96, type=int)
    parser.add_argument('--img_w', default=48, type=int)
    parser.add_argument('--batch-size', default=8, type=int, dest='batch_size', help='identities per batch (x 4 images)')
    parser.add_argument('--epochs', default=8, type=int)
    parser.add_argument('--jobs', default=1, type=int, help='runs at once')
    parser.add_argument('--threads', default=1, type=int, help='torch threads of each run')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--seeds', default=None, help='comma-separated seeds: the study once per seed')
    parser.add_argument('--rejudge', action='store_true',
                        help='judge the last weights of the runs in the results again, without training')
    return parser


def data_flags(args, data_path):
    return ['--dataset', 'synthetic', '--img_h', str(args.img_h), '--img_w', str(args.img_w), '--workers', '0',
            *(['--data_path', str(data_path)] if data_path else [])]


def run_variant(name, args):
    """Fine-tune one variant from random weights and judge it; runs in a worker process.
    Returns {'name', 'flags', 'history', 'seconds', 'test', 'seen'} or {'name', 'flags', 'error'}."""
    import torch
    if args.method == 'agw':
        from AGW import train as method_train
    else:
        from DDAG import train_ddag as method_train

    torch.set_num_threads(args.threads)
    folder = Path(args.out) / name
    flags, launch = split_launch_options([*METHODS[args.method], *VARIANTS[name]])
    batch_size = args.batch_size * launch.get('--batch_scale', 1)
    argv = data_flags(args, args.data_path) + [
        '--arch', args.arch, '--batch-size', str(batch_size), '--epochs', str(args.epochs), '--seed', str(args.seed),
        '--model_path', str(folder), '--log_path', str(folder), '--vis_log_path', str(folder / 'vis'), *flags]
    start = time.time()
    try:
        history = train_run(SCRIPTS[args.method], method_train.main, argv, launch.get('--nproc_per_node', 1),
                            args.threads, Path(args.out) / 'logs' / f'{name}.txt', lambda: next(folder.glob('*.log')))
        judged = judge(name, args)
    except (Exception, SystemExit) as error:  # a failed run stays in the table; its log has the traceback
        return {'name': name, 'flags': flags, 'error': f'{type(error).__name__}: {error}'}
    curves = [{key: float(value) for key, value in epoch.items() if key != 'scores'} for epoch in history]
    return {'name': name, 'flags': flags, 'history': curves, 'seconds': time.time() - start, **judged}


def judge(name, args):
    """The method's test script on the last epoch's weights of run `name` (10 gallery draws averaged,
    the SELECTED feature): {'test': on the held-out identities, 'seen': on the training identities
    (args.seen_path)}, each {'rank1', 'mAP', 'mINP'} as fractions."""
    if args.method == 'agw':
        from AGW import test as method_test
    else:
        from DDAG import test_ddag as method_test
    last_weights, = (Path(args.out) / name).glob(f'*_epoch_{args.epochs - 1}.t')  # the script saves its last epoch
    judged = {}
    for key, data_path in (('test', args.data_path), ('seen', args.seen_path)):
        argv = data_flags(args, data_path) + [*METHODS[args.method], '--resume', str(last_weights)]  # network flags too
        scores = quietly(Path(args.out) / 'logs' / f'{name}.{key}.txt', method_test.main, argv)[SELECTED[args.method]]
        judged[key] = {'rank1': float(scores['cmc'][0]), 'mAP': float(scores['mAP']), 'mINP': float(scores['mINP'])}
    return judged


def training_ids_view(data_path, folder):
    """A SYSU-MM01-layout folder whose test list names the training identities of data_path (its train
    and val lists, both trained on), everything but exp/ linked to data_path's. Returns folder."""
    from data_manager import read_split_ids
    data_path, folder = Path(data_path), Path(folder)
    (folder / 'exp').mkdir(parents=True, exist_ok=True)
    for entry in data_path.iterdir():
        if entry.name != 'exp' and not (folder / entry.name).is_symlink():
            (folder / entry.name).symlink_to(entry.resolve())
    for split in ('train', 'val'):
        shutil.copyfile(data_path / 'exp' / f'{split}_id.txt', folder / 'exp' / f'{split}_id.txt')
    trained = sorted(read_split_ids(data_path, 'train') + read_split_ids(data_path, 'val'))
    (folder / 'exp' / 'test_id.txt').write_text(','.join(map(str, trained)) + '\n')
    return folder


def rejudge(args):
    """judge() again every run of args.out/results.json that did not fail, and rewrite the file."""
    results_file = Path(args.out) / 'results.json'
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for result in results:
        if 'error' not in result:
            result.update(judge(result['name'], args))
            print(f'{result["name"]}: judged again, mAP {100 * result["test"]["mAP"]:.1f}% held-out, '
                  f'{100 * result["seen"]["mAP"]:.1f}% training identities', flush=True)
    results_file.write_text(json.dumps(results, indent=1))


def chance_retrieval(data_path, draws=20):
    """Rank-1 and mAP (fractions) of random distances under the SYSU-MM01 protocol of the test scripts
    (eval_metrics.sysu_retrieval_set: all-search, single-shot, the 10 gallery draws), each draw ranked
    `draws` times: what a network that learnt nothing scores."""
    import numpy as np
    from eval_metrics import sysu_retrieval_set

    def no_features(paths, modal):  # the distances below ignore the features
        return {'random': np.zeros((len(paths), 1), dtype=np.float32)}

    retrieval_set = sysu_retrieval_set(no_features, data_path)
    rng = np.random.default_rng(0)

    def random_distance(query_features, gallery_features):
        return rng.random((len(query_features), len(gallery_features)))

    scores = [trial for _ in range(draws) for trial in retrieval_set.evaluate(random_distance)['random']]
    return float(np.mean([cmc[0] for cmc, _, _ in scores])), float(np.mean([mAP for _, mAP, _ in scores]))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    names = chosen_variants(args.variants, VARIANTS)
    from data_loader import prepare_dataset
    data_path = prepare_dataset('synthetic', args.data_path)
    args.seen_path = str(training_ids_view(data_path, Path(args.out) / 'training_ids'))
    seed_runs = over_seeds(args)
    if args.rejudge:
        for _, seed_args in seed_runs:
            rejudge(seed_args)

    def summary(result):
        return (f'mAP {100 * result["test"]["mAP"]:.1f}% held-out, {100 * result["seen"]["mAP"]:.1f}% training '
                f'identities, last training loss {result["history"][-1]["loss"]:.3f}')

    by_seed = run_variants(run_variant, names, seed_runs, list(VARIANTS), summary)
    method = ' '.join(METHODS[args.method])
    setting = (f'{args.method.upper()} ({method}) fine-tuned from random weights, {args.arch} {args.img_h}x{args.img_w}, '
               f'{args.batch_size} ids x 4 + 4 images, {args.epochs} epochs, {args.data_path or "synthetic"}, '
               f'seeds {", ".join(map(str, by_seed))}, on {device_label(args)}; retrieval: last epoch\'s weights, '
               f'{SELECTED[args.method].upper()} feature, 10 gallery draws averaged')
    out = Path(args.out)
    rank1, mAP = chance_retrieval(data_path)
    write_seed_table(by_seed, out / 'seeds.md', setting, FIGURES,
                     notes=[f'Chance (random distances, same protocol): Rank-1 {100 * rank1:.1f}%, mAP {100 * mAP:.1f}%.'])
    plot_seeds(by_seed, out / 'seeds.png', 'loss', 'training loss', FIGURES['**mAP** (%)'][0],
               f'{SELECTED[args.method].upper()} mAP of the last epoch\'s weights (%)',
               final_reference=(100 * mAP, 'chance (random distances)'))
    print((out / 'seeds.md').read_text())


if __name__ == '__main__':
    main()
