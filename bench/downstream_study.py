"""Does MMGL pre-training help fine-tuning? AGW fine-tuned from MMGL checkpoints against random weights.

Pre-trains one checkpoint per MMGL variant with train.py, fine-tunes AGW (AGW/train.py) from each and
from random weights for the same number of epochs, and tests every fine-tuned network with
AGW/test.py (10 gallery trials averaged). Use a synthetic set with enough test identities to rank
methods, for example 100 (chance Rank-1 1%):

    python synthetic.py --data_path data/synthetic_100 --num_train_ids 99 --num_val_ids 1 --num_test_ids 100
    python bench/downstream_study.py --out bench/results/downstream --data_path data/synthetic_100 --jobs 2

The folder --out receives results.json, table.md and, per run, its checkpoints and logs.
"""
import argparse
import sys
import time
from pathlib import Path

from study_tools import device_label, quietly, run_variants

# MMGL pre-training variants: train.py flags on top of the defaults (SGD, lr 0.1, part-pooled head input).
PRETRAINING = {
    'permutation only': (),
    'permutation + PCC cycle': ('--pcc', '--part', '--pcc_grad', 'backbone'),
    'permutation + PCC figure': ('--pcc', '--part', '--pcc_grad', 'backbone', '--pcc_form', 'figure'),
    # a small share of PCC's gradient in the backbone, where permutation recovery still learns (README)
    'permutation + PCC cycle share 0.005': ('--pcc', '--part', '--pcc_grad', 'backbone', '--pcc_grad_scale', '0.005'),
    'permutation + PCC figure share 0.02': ('--pcc', '--part', '--pcc_grad', 'backbone', '--pcc_form', 'figure',
                                            '--pcc_grad_scale', '0.02'),
}
RANDOM = 'random initialisation'


def get_args_parser():
    parser = argparse.ArgumentParser(description='AGW fine-tuned from MMGL pre-training variants vs random weights')
    parser.add_argument('--out', required=True)
    parser.add_argument('--data_path', required=True, help='a synthetic SYSU-MM01 look-alike (synthetic.py)')
    parser.add_argument('--arch', default='resnet18')
    parser.add_argument('--img_h', default=96, type=int)
    parser.add_argument('--img_w', default=48, type=int)
    parser.add_argument('--pretrain_epochs', default=10, type=int)
    parser.add_argument('--pretrain_steps', default=60, type=int, help='steps per pre-training epoch')
    parser.add_argument('--finetune_epochs', default=8, type=int)
    parser.add_argument('--finetune_batch', default=8, type=int, help='identities per fine-tuning batch (x 4 + 4 images)')
    parser.add_argument('--starts', default='all',
                        help=f'comma-separated starts to compare, or all: {RANDOM}, {", ".join(PRETRAINING)}')
    parser.add_argument('--jobs', default=1, type=int)
    parser.add_argument('--threads', default=1, type=int, help='torch threads of each job')
    parser.add_argument('--seed', default=0, type=int)
    return parser


def run(name, args):
    """Pre-train (unless `name` is RANDOM), fine-tune AGW and test it; runs in a worker process."""
    import torch
    import train as mmgl_train
    from AGW import agw_model, test as agw_test, train as agw_train

    torch.set_num_threads(args.threads)
    folder = Path(args.out) / name.replace(' + ', '_').replace(' ', '_')
    data = ['--dataset', 'synthetic', '--data_path', args.data_path, '--img_h', str(args.img_h),
            '--img_w', str(args.img_w), '--workers', '0', '--seed', str(args.seed)]
    start = time.time()
    try:
        resume = []
        if name != RANDOM:
            pretrain = data + ['--arch', args.arch, *PRETRAINING[name], '--epochs', str(args.pretrain_epochs),
                               '--steps_per_epoch', str(args.pretrain_steps), '--model_path', str(folder),
                               '--log_path', str(folder), '--vis_log_path', str(folder / 'vis')]
            quietly(folder / 'pretrain.txt', mmgl_train.main, pretrain)
            run_name = mmgl_train.run_name(mmgl_train.get_args_parser().parse_args(pretrain))
            resume = ['--resume', str(folder / f'{run_name}_epoch_{args.pretrain_epochs}.t')]
        finetune = data + ['--arch', args.arch, '--method', 'agw', '--lr', '0.1', '--epochs', str(args.finetune_epochs),
                           '--batch-size', str(args.finetune_batch),
                           '--model_path', str(folder), '--log_path', str(folder), '--vis_log_path', str(folder / 'vis'),
                           *resume]
        quietly(folder / 'finetune.txt', agw_train.main, finetune)
        best = folder / f'{agw_model.run_name(agw_train.get_args_parser().parse_args(finetune))}_best.t'
        scores = quietly(folder / 'test.txt', agw_test.main, data + ['--resume', str(best)])
    except (Exception, SystemExit) as error:  # a failed run stays in the table; its log has the traceback
        return {'name': name, 'error': f'{type(error).__name__}: {error}'}
    return {'name': name, 'seconds': time.time() - start,
            'scores': {feature: {'rank1': float(result['cmc'][0]), 'mAP': float(result['mAP']),
                                 'mINP': float(result['mINP'])} for feature, result in scores.items()}}


def write_table(results, path, setting):
    lines = [f'Setting: {setting}', '', '| start | FC Rank-1 / mAP / mINP | POOL Rank-1 / mAP / mINP | time |',
             '|---|---|---|---|']
    for result in results:
        if 'error' in result:
            lines.append(f'| {result["name"]} | failed: {result["error"]} | | |')
            continue
        cells = [' / '.join(f'{100 * result["scores"][feature][key]:.2f}%' for key in ('rank1', 'mAP', 'mINP'))
                 for feature in ('fc', 'pool')]
        lines.append(f'| {result["name"]} | {cells[0]} | {cells[1]} | {result["seconds"] / 60:.0f} min |')
    path.write_text('\n'.join(lines) + '\n')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from data_loader import prepare_dataset
    prepare_dataset('synthetic', args.data_path)
    names = [RANDOM, *PRETRAINING] if args.starts == 'all' else args.starts.split(',')
    unknown = [name for name in names if name != RANDOM and name not in PRETRAINING]
    if unknown:
        sys.exit(f'error: --starts: unknown start(s) {unknown}: choose from {[RANDOM, *PRETRAINING]}')

    def summary(result):
        return ', '.join(f'{feature} Rank-1 {100 * scores["rank1"]:.2f}% mAP {100 * scores["mAP"]:.2f}%'
                         for feature, scores in result['scores'].items())

    results = run_variants(run, names, [(args.seed, args)], [RANDOM, *PRETRAINING], summary)[args.seed]
    setting = (f'AGW fine-tuning of {args.arch} at {args.img_h}x{args.img_w} for {args.finetune_epochs} epochs '
               f'(lr 0.1, {args.finetune_batch} ids x 4 + 4 images); MMGL pre-training {args.pretrain_epochs} epochs x '
               f'{args.pretrain_steps} steps of 8+8 images; {args.data_path}; 10 gallery trials averaged; '
               f'{device_label(args)}')
    write_table(results, out / 'table.md', setting)
    print((out / 'table.md').read_text())


if __name__ == '__main__':
    main()
