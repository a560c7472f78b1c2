"""How many operators a training step runs: the MMGL, AGW and DDAG steps of bench/throughput.py under
torch.profiler on the CPU, in three phases: the forward pass with the losses, the backward pass, the
optimiser step.

    python bench/step_ops.py          # ResNet-50; the count does not depend on the image size

Two counts per phase. Operators: the ATen operators the step calls (each one the host's dispatch
work). Kernels: the operators that do the work, those that call no other ATen operator, less views
and allocations; on a GPU each is about one kernel launch. A composite operator runs several (a
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


def is_aten_parent(event):
    return event.cpu_parent is not None and is_aten(event.cpu_parent)


def outermost(event):
    while is_aten_parent(event):
        event = event.cpu_parent
    return event


class PhaseCount:
    """The ATen operators of one profiled phase: `operators`, those called from outside ATen;
    `kernels`, those that do work themselves: not a view or an allocation, and calling no operator
    that does (a foreach operator counts as one, whatever it calls); `by_caller`, the kernels counted
    by the outermost ATen operator they run under."""

    def __init__(self, events):
        aten = [event for event in events if is_aten(event)]
        self.operators = sum(1 for event in aten if not is_aten_parent(event))
        kernels = [event for event in aten if self.is_kernel(event)]
        self.kernels = len(kernels)
        self.by_caller = collections.Counter(outermost(event).name.removeprefix('aten::') for event in kernels)

    @staticmethod
    def works(event):
        """Whether the event or one under it launches a kernel."""
        return event.name not in NO_KERNEL or any(PhaseCount.works(child) for child in event.cpu_children
                                                  if is_aten(child))

    @staticmethod
    def is_kernel(event):
        parent = event.cpu_parent
        while parent is not None and is_aten(parent):  # the work of a foreach operator is its own
            if parent.name.startswith('aten::_foreach'):
                return False
            parent = parent.cpu_parent
        if event.name in NO_KERNEL:
            return False
        return event.name.startswith('aten::_foreach') or not any(
            PhaseCount.works(child) for child in event.cpu_children if is_aten(child))


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
