"""Side-by-side study of MMGL pre-training variants: does permutation recovery learn, and with what?

Each variant is a set of train.py flags on top of the paper's command (--stream two --lr 0.1 --pcc
--part, SGD, 6 stripes, cl_weight 0.5, cl_temp 0.07, 20 Sinkhorn iterations). Every variant is
trained at the same size on as many images (a variant with a larger global batch, in one process,
under torchrun or with --accum_iter, takes fewer optimiser steps: study_tools.LAUNCH_OPTIONS), then judged by test.py on the held-out test
identities.
The folder --out receives:
    results.json     per variant: its flags, the per-epoch training history and the test figures
    table.md         one row per variant (failed runs kept, with their error)
    curves.png       exact and per-stripe permutation accuracy and the PCC loss against epochs
    <variant>/       the run's checkpoints and logs; logs/<variant>.txt its console output

    python bench/pretext_study.py --out study/cpu --arch resnet18 --img_h 48 --img_w 24 --epochs 10 \\
        --steps_per_epoch 60 --jobs 2

With --seeds 0,1,2 the study runs once per seed into <out>/seed<N>/ (each folder as above), and
<out>/seeds.md and seeds.png say how far the variants differ beyond the spread between seeds: each
variant's figures over the seeds, and its difference from the first variant seed by seed.
"""
import argparse
import time
from pathlib import Path

from study_tools import (chosen_variants, device_label, over_seeds, plot_seeds, quietly, run_variants,
                         split_launch_options, train_run, write_seed_table)

# The paper's command, with the paper's choices where train.py's defaults deviate from it (the
# global-average head input, PCC's gradient in the backbone); each variant adds or overrides flags.
PAPER = ('--stream', 'two', '--lr', '0.1', '--optim', 'sgd', '--pcc', '--part', '--perm_input', 'gap',
         '--pcc_grad', 'backbone')
VARIANTS = {
    'paper': (),
    'paper+nopcc': ('--no_pcc',),
    'paper+onestream': ('--stream', 'one'),
    'paper+mse_sum': ('--perm_loss', 'mse_sum'),
    'paper+ce': ('--perm_loss', 'ce'),
    'paper+tau0.1': ('--sinkhorn_tau', '0.1'),
    'paper+bn': ('--perm_bn',),
    'parts': ('--perm_input', 'parts'),
    'parts+nopcc': ('--perm_input', 'parts', '--no_pcc'),
    'parts+mse_sum': ('--perm_input', 'parts', '--perm_loss', 'mse_sum'),
    'parts+mse_sum+nopcc': ('--perm_input', 'parts', '--perm_loss', 'mse_sum', '--no_pcc'),
    'parts+ce': ('--perm_input', 'parts', '--perm_loss', 'ce'),
    'parts+bn': ('--perm_input', 'parts', '--perm_bn'),
    'parts+w0.05': ('--perm_input', 'parts', '--cl_weight', '0.05'),
    'parts+warmup': ('--perm_input', 'parts', '--cl_warmup', '10'),
    'parts+figure': ('--perm_input', 'parts', '--pcc_form', 'figure'),
    # letting PCC shape the backbone without stopping permutation recovery
    'parts+share0.1': ('--perm_input', 'parts', '--pcc_grad_scale', '0.1'),
    'parts+share0.02': ('--perm_input', 'parts', '--pcc_grad_scale', '0.02'),
    'parts+share0.005': ('--perm_input', 'parts', '--pcc_grad_scale', '0.005'),
    'parts+figure+share0.02': ('--perm_input', 'parts', '--pcc_form', 'figure', '--pcc_grad_scale', '0.02'),
    'parts+from5': ('--perm_input', 'parts', '--pcc_start', '5'),
    'parts+plain': ('--perm_input', 'parts', '--pcc_views', 'plain'),
    # train.py's defaults: PCC trains its projections only
    'default': ('--perm_input', 'parts', '--pcc_grad', 'heads'),
    'default+onestream': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--stream', 'one'),
    'default+figure': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--pcc_form', 'figure'),
    # the speed flags must not change what is learnt
    'default+amp': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', '--channels_last'),
    'default+device_augment': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--augment', 'device'),
    # float16 with gradient scaling, what --amp picks on GPUs without native bfloat16 (the paper's 2080Ti)
    'default+amp_fp16': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', 'fp16', '--channels_last'),
    # all three speed flags (the GPU runs of bench/gpu_session.sh)
    'default+fast': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', '--channels_last', '--augment', 'device'),
    'default+onestream+fast': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--stream', 'one', '--amp',
                               '--channels_last', '--augment', 'device'),
    # ... with the batches held on the device (the fastest but for --compile)
    'default+fast+device_data': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', '--channels_last', '--augment',
                                 'device', '--data_on_device'),
    # ... and the two flags that made one GPU reach 5,000 images/s (README, Speed): the same batches, held on
    # the device, and the network in CUDA graphs
    'default+fastest': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', '--channels_last', '--augment', 'device',
                        '--data_on_device', '--compile', 'reduce-overhead'),
    # ... with the network compiled by inductor but not in CUDA graphs (torch.compile's default mode)
    'default+fast+device_data+compile': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--amp', '--channels_last',
                                         '--augment', 'device', '--data_on_device', '--compile'),
    # twice the global batch over the same images (study_tools.LAUNCH_OPTIONS), with the learning rate scaled
    # linearly (the README's rule for torchrun) or not, in one process and under torchrun
    'default+batch2x': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '2', '--lr', '0.2'),
    'default+batch2x_lr0.1': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '2'),
    'default+torchrun2': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--nproc_per_node', '2', '--lr', '0.2'),
    'default+torchrun2_lr0.1': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--nproc_per_node', '2'),
    'default+batch4x': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '4', '--lr', '0.4'),
    # ... four times the batch at the square-root rule's rate, and at twice the linear rule's
    'default+batch4x_lr0.2': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '4', '--lr', '0.2'),
    'default+batch4x_lr0.8': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '4', '--lr', '0.8'),
    # ... four times the batch with the fastest GPU setting's flags but --amp (fp32), without and with --compile
    # (inductor on the CPU, no CUDA graphs): do they hold over a run at the batch where the GPU's held-out figures
    # fell short?
    'default+batch4x+device_data': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '4', '--lr', '0.4',
                                    '--channels_last', '--augment', 'device', '--data_on_device'),
    'default+batch4x+device_data+compile': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '4',
                                            '--lr', '0.4', '--channels_last', '--augment', 'device', '--data_on_device',
                                            '--compile'),
    # ... and the defaults' batch at twice the rate: is the setting starved of learning rate?
    'default+lr0.2': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--lr', '0.2'),
    # ... and in one process with batch norm over two halves of the batch, as each of torchrun's processes has it
    'default+batch2x_ghostbn2': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--batch_scale', '2', '--lr', '0.2',
                                 '--ghost_bn', '2'),
    # ... and as torchrun's two processes would, in one: two batches of the study's size a step (--accum_iter)
    'default+accum2': ('--perm_input', 'parts', '--pcc_grad', 'heads', '--accum_iter', '2', '--lr', '0.2'),
}


def get_args_parser():
    parser = argparse.ArgumentParser(description='Run MMGL pre-training variants side by side and tabulate them')
    parser.add_argument('--out', required=True, help='folder for the results, the table and the plot')
    parser.add_argument('--variants', default='all',
                        help=f'comma-separated variant names, or all: {", ".join(VARIANTS)}')
    parser.add_argument('--dataset', default='synthetic', choices=['sysu', 'regdb', 'synthetic'])
    parser.add_argument('--data_path', default=None)
    parser.add_argument('--arch', default='resnet50')
    parser.add_argument('--img_h', default=96, type=int)
    parser.add_argument('--img_w', default=48, type=int)
    parser.add_argument('--batch-size', default=8, type=int, dest='batch_size')
    parser.add_argument('--epochs', default=30, type=int)
    parser.add_argument('--steps_per_epoch', default=0, type=int, help='0: one pass over the visible images')
    parser.add_argument('--jobs', default=1, type=int, help='variants trained at once')
    parser.add_argument('--threads', default=1, type=int, help='torch threads of each job')
    parser.add_argument('--workers', default=0, type=int, help='data-loading processes of each job')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--seeds', default=None, help='comma-separated seeds: the study once per seed, and the spread')
    parser.add_argument('--gpu', default='0')
    return parser


def variant_flags(name):
    """train.py flags of a variant: the paper's command with the variant's changes ('--no_pcc' drops PCC;
    the study's LAUNCH_OPTIONS are left out)."""
    extra, _ = split_launch_options(VARIANTS[name])
    flags = list(PAPER)
    if '--no_pcc' in extra:
        flags = flags[:flags.index('--pcc')] + flags[flags.index('--part') + 1:]
    return flags + [flag for flag in extra if flag != '--no_pcc']


def run_variant(name, args):
    """Train one variant and judge it on the test identities; runs in a worker process.
    Returns {'name', 'flags', 'history', 'test', 'seconds'} or {'name', 'flags', 'error'}."""
    import torch
    import test as mmgl_test
    import train as mmgl_train

    torch.set_num_threads(args.threads)
    folder = Path(args.out) / name
    common = ['--dataset', args.dataset, '--img_h', str(args.img_h), '--img_w', str(args.img_w),
              '--workers', str(args.workers), '--seed', str(args.seed), '--gpu', args.gpu]
    if args.data_path:
        common += ['--data_path', args.data_path]
    flags, launch = variant_flags(name), split_launch_options(VARIANTS[name])[1]
    batch_scale, processes = launch.get('--batch_scale', 1), launch.get('--nproc_per_node', 1)
    # the same images an epoch: its optimiser steps are this many times fewer
    fewer_steps = batch_scale * processes * mmgl_train.get_args_parser().parse_args(common + flags).accum_iter
    if args.steps_per_epoch % fewer_steps:
        return {'name': name, 'flags': flags, 'error': f'--steps_per_epoch {args.steps_per_epoch} is not a multiple of '
                                                       f'the {fewer_steps} the variant divides it by'}
    train_argv = common + flags + ['--arch', args.arch, '--batch-size', str(args.batch_size * batch_scale),
                                   '--epochs', str(args.epochs),
                                   '--steps_per_epoch', str(args.steps_per_epoch // fewer_steps),
                                   '--save_epoch', str(args.epochs), '--model_path', str(folder),
                                   '--log_path', str(folder), '--vis_log_path', str(folder / 'vis')]
    run_name = mmgl_train.run_name(mmgl_train.get_args_parser().parse_args(train_argv))

    log_file = Path(args.out) / 'logs' / f'{name}.txt'
    start = time.time()
    try:
        history = train_run('train.py', mmgl_train.main, train_argv, processes, args.threads, log_file,
                            lambda: folder / f'{run_name}.log')
        weights = folder / f'{run_name}_epoch_{args.epochs}.t'
        results = quietly(log_file.parent / f'{name}.test.txt', mmgl_test.main, common + ['--resume', str(weights)])
    except (Exception, SystemExit) as error:  # a failed variant stays in the table
        return {'name': name, 'flags': flags, 'error': f'{type(error).__name__}: {error}'}
    test = {'perm_exact': results['perm_exact'], 'perm_stripe': results['perm_stripe'],
            'rank1': float(results['cmc'][0]), 'mAP': float(results['mAP'])}
    return {'name': name, 'flags': flags, 'history': history, 'test': test, 'seconds': time.time() - start}


def write_table(results, path, setting):
    lines = [f'Setting: {setting}', '',
             '| variant | flags added to the paper\'s | train exact (last epoch) | train per-stripe | '
             'first / last PCC loss | **test exact** | test per-stripe | zero-shot R1 / mAP | time |',
             '|---|---|---|---|---|---|---|---|---|']
    for result in results:
        flags = ' '.join(VARIANTS[result.get('variant', result['name'])]) or '(none)'  # runs_table's runs name a seed
        if 'error' in result:
            lines.append(f'| {result["name"]} | `{flags}` | failed: {result["error"]} | | | | | | |')
            continue
        last, first = result['history'][-1], result['history'][0]
        test = result['test']
        pcc = f'{first["pcc_loss"]:.3f} / {last["pcc_loss"]:.3f}' if '--pcc' in result['flags'] else '-'
        lines.append(f'| {result["name"]} | `{flags}` | {100 * last["perm_exact"]:.1f}% | '
                     f'{100 * last["perm_stripe"]:.1f}% | {pcc} | **{100 * test["perm_exact"]:.1f}%** | '
                     f'{100 * test["perm_stripe"]:.1f}% | {100 * test["rank1"]:.1f}% / {100 * test["mAP"]:.1f}% | '
                     f'{result["seconds"] / 60:.0f} min |')
    lines += ['', 'Chance: exact 1/720 = 0.14%, per stripe 1/6 = 16.7%. Train figures are on the augmented, '
              'shuffled training batches of the last epoch; test figures on the held-out test identities '
              '(test.py, stripes shuffled with seeded permutations).']
    path.write_text('\n'.join(lines) + '\n')


def plot_curves(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = (('perm_exact', 'exact permutation accuracy (train)'),
              ('perm_stripe', 'per-stripe accuracy (train)'), ('pcc_loss', 'PCC loss'))
    colours = plt.get_cmap('tab10').colors  # ten colours, then the same ten dashed, then dotted
    for index, result in enumerate(results):
        if 'error' in result:
            continue
        style = dict(color=colours[index % 10], linestyle=('-', '--', ':')[index // 10 % 3], label=result['name'])
        epochs = [epoch['epoch'] + 1 for epoch in result['history']]  # epochs trained: the same images in every variant
        for axis, (key, _) in zip(axes, panels):
            if key == 'pcc_loss' and '--pcc' not in result['flags']:
                continue
            axis.plot(epochs, [epoch[key] for epoch in result['history']], **style)
    for axis, (key, title) in zip(axes, panels):
        axis.set_title(title)
        axis.set_xlabel('epochs')
        axis.grid(alpha=0.3)
    axes[0].axhline(1 / 720, color='black', linestyle='-.', linewidth=0.8, label='chance')
    axes[1].axhline(1 / 6, color='black', linestyle='-.', linewidth=0.8, label='chance')
    axes[0].legend(fontsize=7, loc='upper left')
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# The seed study's figures (--seeds): the first is also shown seed by seed.
SEED_FIGURES = {'**test exact** (%)': (lambda result: 100 * result['test']['perm_exact'], 1),
                'test per-stripe (%)': (lambda result: 100 * result['test']['perm_stripe'], 1),
                'train exact, last epoch (%)': (lambda result: 100 * result['history'][-1]['perm_exact'], 1)}


def write_seed_study(by_seed, stem, setting):
    """<stem>.md and <stem>.png of a study over seeds (study_tools.write_seed_table, plot_seeds: the
    training curve of exact recovery, the held-out exact of each seed), and print the table."""
    write_seed_table(by_seed, stem.with_suffix('.md'), setting, SEED_FIGURES)
    plot_seeds(by_seed, stem.with_suffix('.png'), 'perm_exact', 'exact permutation accuracy (train)',
               SEED_FIGURES['**test exact** (%)'][0], 'test exact on the held-out identities (%)')
    print(stem.with_suffix('.md').read_text())


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    names = chosen_variants(args.variants, VARIANTS)
    seed_runs = over_seeds(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Data are prepared once, before the workers start (the synthetic set is generated on first use).
    from data_loader import prepare_dataset
    prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')

    def summary(result):
        return f'test exact {100 * result["test"]["perm_exact"]:.1f}%, per stripe {100 * result["test"]["perm_stripe"]:.1f}%'

    setting = (f'{args.arch}, {args.img_h}x{args.img_w}, batch {args.batch_size}+{args.batch_size}, ' +
               (f'{args.epochs} epochs of {args.steps_per_epoch} steps, ' if args.steps_per_epoch else
                f'{args.epochs} epochs of one pass over the visible images, ') + f'{args.dataset}, ')
    by_seed = run_variants(run_variant, names, seed_runs, list(VARIANTS), summary)
    for seed, seed_args in seed_runs:
        seed_out = Path(seed_args.out)
        write_table(by_seed[seed], seed_out / 'table.md', setting + f'seed {seed}, on {device_label(args)}')
        plot_curves(by_seed[seed], seed_out / 'curves.png')
        print((seed_out / 'table.md').read_text())
    if args.seeds:
        write_seed_study(by_seed, out / 'seeds', setting + f'seeds {args.seeds}, on {device_label(args)}')


if __name__ == '__main__':
    main()
