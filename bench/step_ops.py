"""How many operators a training step dispatches: the MMGL, AGW and DDAG steps of bench/throughput.py,
counted at the ATen level (each one the host's dispatch work; most of them a kernel launch on a GPU)
in three phases: the forward pass with the losses, the backward pass, the optimiser step.

    python bench/step_ops.py          # ResNet-50; the count does not depend on the image size

On a GPU each operator costs the host some microseconds of Python and dispatch, whatever the size of
its kernel; when the count times that cost exceeds the kernels' own time, the card waits for the host
and the step time is about count x cost, which neither mixed precision nor channels_last changes.
The count runs on the CPU at a small image size (the same operators as on a GPU at any size), with
the optimiser's multi-tensor (foreach) path, which PyTorch takes on GPUs by default.
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import networks_and_steps, training_setup  # noqa: E402  (it puts the repository on the path)
import utils  # noqa: E402
from model import ARCHS  # noqa: E402


# Operators that launch no kernel: views and detaches (func.is_view), allocations, reshapes of a view.
NO_KERNEL = {'aten.empty', 'aten.empty_strided', 'aten.empty_like', 'aten._unsafe_view'}


class OperatorCount(TorchDispatchMode):
    """Counts every ATen operator dispatched while active, by name, and apart those that launch a kernel."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        self.kernels += not (func.is_view or name in NO_KERNEL)
        return func(*args, **(kwargs or {}))


def count_step(build, step):
    """{phase: OperatorCount} of one training step after a first one (the optimiser has its state)."""
    model, optimizer, (visible, thermal, labels) = training_setup(build, 8, 48, 24, torch.device('cpu'))
    for group in optimizer.param_groups:
        group['foreach'] = True  # the GPU default
    for _ in range(2):  # count the second step
        with OperatorCount() as forward:
            loss, _ = step(model, visible, thermal, labels, epoch=20)
        with OperatorCount() as backward:
            loss.backward()
        with OperatorCount() as update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        phases = {'forward + losses': forward, 'backward': backward, 'optimiser': update}
    return phases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--top', default=8, type=int, help='the most frequent operators of the forward pass shown')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f'ATen operators per training step, {args.arch} (counted on the CPU, foreach optimiser): all of '
             f'them / those that launch a kernel (not views, detaches or allocations)', '',
             '| training step | forward + losses | backward | optimiser | in all | most frequent in the forward pass |',
             '|---|---|---|---|---|---|']
    for method, (build, step) in networks_and_steps(args).items():
        phases = count_step(build, step)
        cells = [(sum(phase.counts.values()), phase.kernels) for phase in phases.values()]
        cells.append(tuple(map(sum, zip(*cells))))
        frequent = ', '.join(f'{name.removeprefix("aten.")} {count}'
                             for name, count in phases['forward + losses'].counts.most_common(args.top))
        lines.append(f'| {method} | {" | ".join(f"{every} / {kernels}" for every, kernels in cells)} | {frequent} |')
    print('\n'.join(lines))


if __name__ == '__main__':
    utils.run_main(main)
