"""Where a training step's time goes: is the GPU kept busy, or does it wait for the host?

Each row times the MMGL, AGW or DDAG training step as bench/throughput.py does (wall time, no
profiler), then runs the same steps under torch.profiler and adds up the time the GPU spent in
kernels and copies. Busy = that time / the wall time: near 100% the card's arithmetic is the limit,
and fewer or cheaper kernels (mixed precision, channels_last) pay; far below it the card waits while
the host dispatches the next operators, and only fewer dispatches pay (torch.compile's fusion,
CUDA graphs, a larger batch for the same dispatches). After the table, each row's operators that took
the most GPU time (the CPU's time on a machine without a GPU, where busy is not measured).

    python bench/step_profile.py                      # GPU: ResNet-50 288x144, batch 32+32
    python bench/step_profile.py --arch resnet18 --img_h 96 --img_w 48 --batch 8 --steps 3 --methods mmgl   # CPU
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_tools import publish  # noqa: E402
from throughput import METHODS, PRECISIONS, milliseconds_per_step, networks_and_steps, step_runner  # noqa: E402
import engine  # noqa: E402  (throughput puts the repository on the path)
import utils  # noqa: E402
from model import ARCHS  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--batch', default=32, type=int, help='images per modality in a step')
    parser.add_argument('--warmup', default=5, type=int)
    parser.add_argument('--steps', default=10, type=int, help='steps timed, then as many profiled')
    parser.add_argument('--methods', default='mmgl,agw', type=lambda text: text.split(','),
                        help=f'a comma list of {", ".join(METHODS)}')
    parser.add_argument('--precisions', default='fp32,amp + channels_last',
                        help=f'a comma list of: {", ".join(PRECISIONS)}')
    parser.add_argument('--top', default=12, type=int, help='operators listed per row')
    parser.add_argument('--gpu', default='0')
    parser.add_argument('--out', default=None, help='also write the report to this Markdown file')
    return parser


def profile_steps(one_step, steps, device):
    """(device milliseconds per step or None, kernels per step or None, the profile) of `steps` calls."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as profiled:
        for _ in range(steps):
            one_step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    if device.type != 'cuda':
        return None, None, profiled
    # Kernels, copies and memsets; the GPU-side marks of record_function ranges would count twice.
    kernels = [event for event in profiled.events()
               if event.device_type == DeviceType.CUDA and not getattr(event, 'is_user_annotation', False)]
    busy_us = sum(event.self_device_time_total for event in kernels)
    return busy_us / 1000 / steps, len(kernels) / steps, profiled


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    unknown = [name for name in args.precisions.split(',') if name not in PRECISIONS]
    if unknown:
        raise utils.UserError(f'--precisions: unknown {unknown[0]!r}; choose from {", ".join(PRECISIONS)}.')
    device = utils.select_device(args.gpu)
    card = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    lines = [f'{card}, torch {torch.__version__}, {args.arch} {args.img_h}x{args.img_w}, {args.batch}+{args.batch} '
             f'images a step, {args.steps} steps timed and {args.steps} profiled', '',
             '| training step | precision | ms/step | GPU ms/step (kernels and copies) | GPU busy '
             '| GPU operations a step |',
             '|---|---|---|---|---|---|']
    sort_key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    tops = []
    for method, (build, step) in networks_and_steps(args, args.methods).items():
        for name in args.precisions.split(','):
            options = PRECISIONS[name]
            precision = engine.Precision(options['amp'], device)
            one_step = step_runner(build, step, precision, options, args.batch, args, device)
            milliseconds = milliseconds_per_step(one_step, args.steps, device)
            device_ms, kernels, profiled = profile_steps(one_step, args.steps, device)
            figures = ('- | - | -' if device_ms is None else
                       f'{device_ms:.1f} | {100 * device_ms / milliseconds:.0f}% | {kernels:.0f}')
            lines.append(f'| {method} | {name} ({precision}) | {milliseconds:.1f} | {figures} |')
            print(lines[-1], flush=True)
            tops += ['', f'{method}, {name}: the {args.top} operators with the most {sort_key} over {args.steps} steps',
                     '```', profiled.key_averages().table(sort_by=sort_key, row_limit=args.top), '```']
    publish('\n'.join(lines + tops), args.out)


if __name__ == '__main__':
    utils.run_main(main)
