"""How many operators a training step runs: the MMGL, AGW and DDAG steps of bench/throughput.py under
torch.profiler on the CPU, in three phases: the forward pass with the losses, the backward pass, the
optimiser step.

    python bench/step_ops.py          # ResNet-50; the count does not depend on the image size

Two counts per phase. Operators: the ATen operators the step calls (each one the host's dispatch
work). Kernels: the operators that do work themselves, calling none that does (views and
allocations do none); on a GPU each is about one kernel launch. A composite operator runs several (a
logsumexp is nine: a max, the masking of infinities, a subtraction, an exponential, a sum, a log,
...), so the kernels can outnumber the operators. On a GPU each launch costs the host some
microseconds whatever the size of its kernel; when the count times that cost exceeds the kernels'
own time, the card waits for the host and the step time is about count x cost, which neither mixed
precision nor channels_last changes. The count runs on the CPU at a small image size (the same
operators as on a GPU at any size), with the optimiser's multi-tensor (foreach) path, which PyTorch
takes on GPUs by default: a foreach operator counts as one kernel (on a GPU it launches one per
chunk of tensors; on a CPU it loops over them). After the table, the operators whose kernels are
most numerous in the forward and backward passes, by the operator the step called (in the backward
pass, the first one under each autograd function).

    python bench/step_ops.py --loop   # what train.py's loop runs around the step (ResNet-50, 8+8, 48x24)

--loop counts instead what an iteration of train.py's epoch loop runs (MMGL, --pcc --part, the second
of two epochs of --loop_steps steps, foreach optimiser), inside engine.train_step (the batch to the
device and its augmentation there, the step, backward and optimiser) and outside it (the loader's
batch, the running totals of the logged values, progress), for each way the batches come.
"""
import argparse
import collections
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import networks_and_steps, training_setup  # noqa: E402  (it puts the repository on the path)
import engine  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from model import ARCHS  # noqa: E402

# Operators that launch no kernel: views, detaches, allocations.
NO_KERNEL = {'aten::empty', 'aten::empty_strided', 'aten::empty_like', 'aten::as_strided', 'aten::as_strided_',
             'aten::view', 'aten::_unsafe_view', 'aten::_reshape_alias', 'aten::reshape', 'aten::alias',
             'aten::detach', 'aten::detach_', 'aten::t', 'aten::transpose', 'aten::permute', 'aten::expand',
             'aten::unsqueeze', 'aten::squeeze', 'aten::slice', 'aten::select', 'aten::unfold', 'aten::lift_fresh',
             'aten::resize_', 'aten::set_', 'aten::flatten', 'aten::view_as', 'aten::expand_as', 'aten::split',
             'aten::unbind', 'aten::narrow', 'aten::chunk', 'aten::result_type', 'aten::real'}


def is_aten(event):
    return event.name.startswith('aten::')


def aten_ancestors(event):
    """The ATen operators an event runs under, innermost first."""
    while event.cpu_parent is not None and is_aten(event.cpu_parent):
        event = event.cpu_parent
        yield event


def aten_children(event):
    return [child for child in event.cpu_children if is_aten(child)]


def launches(event):
    """Whether the event, or an operator under it, launches a kernel."""
    return event.name not in NO_KERNEL or any(map(launches, aten_children(event)))


def is_kernel(event):
    """Whether the event does work itself: not a view or an allocation, and calling no operator that
    launches a kernel; a foreach operator counts as one kernel, whatever it calls."""
    if event.name in NO_KERNEL or any(outer.name.startswith('aten::_foreach') for outer in aten_ancestors(event)):
        return False
    return event.name.startswith('aten::_foreach') or not any(map(launches, aten_children(event)))


class PhaseCount:
    """The ATen operators of one profiled phase: `operators`, those called from outside ATen;
    `kernels`, those that do work themselves (is_kernel); `by_caller`, the kernels counted by the
    outermost ATen operator they run under."""

    def __init__(self, events):
        aten = [event for event in events if is_aten(event)]
        self.operators = sum(1 for event in aten if not any(aten_ancestors(event)))
        kernels = [event for event in aten if is_kernel(event)]
        self.kernels = len(kernels)
        self.by_caller = collections.Counter([event, *aten_ancestors(event)][-1].name.removeprefix('aten::')
                                             for event in kernels)


def profiled(function):
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        result = function()
    return result, PhaseCount(profiler.events())


def count_step(build, step):
    """{phase: PhaseCount} of one training step after a first one (the optimiser has its state)."""
    model, optimizer, (visible, thermal, labels) = training_setup(build, 8, 48, 24, torch.device('cpu'))
    for group in optimizer.param_groups:
        group['foreach'] = True  # the GPU default
    for _ in range(2):  # count the second step
        (loss, _), forward = profiled(lambda: step(model, visible, thermal, labels, epoch=20))
        _, backward = profiled(loss.backward)
        _, update = profiled(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {'forward + losses': forward, 'backward': backward, 'optimiser': update}


# The ways train.py's batches come, for --loop.
LOOP_ROWS = {'--augment loader': ('--augment', 'loader'), '--augment device': ('--augment', 'device'),
             '--augment device --data_on_device': ('--augment', 'device', '--data_on_device')}
STEP_MARK = 'engine.train_step'


@contextlib.contextmanager
def marked_training_loop(epoch_profiles):
    """While open, each train.py epoch after the first runs under the profiler (its events appended to
    epoch_profiles), with engine.train_step marked and the optimiser on its foreach path."""
    train_step, train_one_epoch, make_optimizer = engine.train_step, engine.train_one_epoch, utils.make_optimizer

    def marked_step(*args, **kwargs):
        with torch.profiler.record_function(STEP_MARK):
            return train_step(*args, **kwargs)

    def profiled_epoch(run, model, optimizer, step, loader, epoch):
        if epoch == 0:  # the first epoch gives the optimiser its state
            return train_one_epoch(run, model, optimizer, step, loader, epoch)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            stats = train_one_epoch(run, model, optimizer, step, loader, epoch)
        epoch_profiles.append(profiler.events())
        return stats

    def foreach_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        for group in optimizer.param_groups:
            group['foreach'] = True  # the GPU default
        return optimizer

    engine.train_step, engine.train_one_epoch, utils.make_optimizer = marked_step, profiled_epoch, foreach_optimizer
    try:
        yield
    finally:
        engine.train_step, engine.train_one_epoch, utils.make_optimizer = train_step, train_one_epoch, make_optimizer


def in_step(event):
    while event is not None:
        if event.name == STEP_MARK:
            return True
        event = event.cpu_parent
    return False


def count_loop(arch, steps, flags, data_path=None):
    """(PhaseCount inside engine.train_step, PhaseCount outside it) of train.py's second epoch of `steps`
    steps on the synthetic set (or the one at data_path, in its layout), with flags."""
    epoch_profiles = []
    with tempfile.TemporaryDirectory() as folder, marked_training_loop(epoch_profiles):
        train.main(['--dataset', 'synthetic', '--arch', arch, '--img_h', '48', '--img_w', '24', '--batch-size', '8',
                    '--epochs', '2', '--steps_per_epoch', str(steps), '--workers', '0', '--pcc', '--part',
                    '--model_path', folder, '--log_path', folder, '--vis_log_path', folder, *flags,
                    *(['--data_path', str(data_path)] if data_path else [])])
    events = [event for event in epoch_profiles[0] if is_aten(event)]
    return (PhaseCount([event for event in events if in_step(event)]),
            PhaseCount([event for event in events if not in_step(event)]))


def loop_table(args):
    lines = [f'Operators / kernels per iteration of train.py\'s epoch loop, {args.arch}, MMGL --pcc --part, 8+8 '
             f'images at 48x24, the second of two epochs of {args.loop_steps} steps (counted on the CPU, foreach '
             'optimiser)', '',
             '| batches | in engine.train_step | outside it | outside it, most kernels |', '|---|---|---|---|']
    for name, flags in LOOP_ROWS.items():
        inside, outside = count_loop(args.arch, args.loop_steps, flags, args.data_path)
        cells = [f'{count.operators / args.loop_steps:.0f} / {count.kernels / args.loop_steps:.0f}'
                 for count in (inside, outside)]
        most = ', '.join(f'{caller} {count / args.loop_steps:.1f}' for caller, count in outside.by_caller.most_common(args.top))
        lines.append(f'| {name} | {" | ".join(cells)} | {most} |')
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--top', default=8, type=int, help='the operators with the most kernels shown')
    parser.add_argument('--loop', action='store_true', help="count train.py's loop around the step instead")
    parser.add_argument('--loop_steps', default=6, type=int, help='steps of the counted epoch (--loop)')
    parser.add_argument('--data_path', default=None, help='the synthetic set of --loop, if not data/synthetic')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.loop:
        print('\n'.join(loop_table(args)))
        return
    lines = [f'Operators / kernels per training step, {args.arch} (counted on the CPU, foreach optimiser; '
             f'kernels: the operators that do the work, less views and allocations)', '',
             '| training step | forward + losses | backward | optimiser | in all | most kernels, forward and backward |',
             '|---|---|---|---|---|---|']
    for method, (build, step) in networks_and_steps(args).items():
        phases = count_step(build, step)
        cells = [(phase.operators, phase.kernels) for phase in phases.values()]
        cells.append(tuple(map(sum, zip(*cells))))
        callers = phases['forward + losses'].by_caller + phases['backward'].by_caller
        most = ', '.join(f'{name} {count}' for name, count in callers.most_common(args.top))
        lines.append(f'| {method} | {" | ".join(f"{operators} / {kernels}" for operators, kernels in cells)} | {most} |')
    print('\n'.join(lines))


if __name__ == '__main__':
    utils.run_main(main)
