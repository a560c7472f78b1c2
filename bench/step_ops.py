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
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import networks_and_steps, training_setup  # noqa: E402  (it puts the repository on the path)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--top', default=8, type=int, help='the operators with the most kernels shown')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
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
