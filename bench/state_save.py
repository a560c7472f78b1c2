"""What writing <run>_state.t costs a pre-training run, and what is left of it with the background writer.

    python bench/state_save.py                  # ResNet-50, as train.py saves it after every epoch

The state of an MMGL network (--pcc --part) and its SGD optimiser with momentum, as engine.fit hands
it over after an epoch: the seconds torch.save takes in the main thread (the median of --repeats
saves into a temporary folder), its size, and how fast the main thread dispatches small torch
operators (a stand-in for a training loop bound by the host) on its own and while
utils.BackgroundWriter writes the same state in its thread.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import utils  # noqa: E402
from model import ARCHS, MMGLNet  # noqa: E402


def operators_per_second(keep_going):
    """Small operators the main thread dispatches a second while keep_going() (at least one)."""
    tensor, count, start = torch.zeros(64), 0, time.perf_counter()
    while count == 0 or keep_going():
        tensor.add(1).mul(2)
        count += 2
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--repeats', default=3, type=int)
    args = parser.parse_args(argv)

    model = MMGLNet(args.arch, 'two', 6, part=True, perm_input='parts')
    optimizer = utils.make_optimizer(model.parameters(), 0.1)
    outputs = model(torch.randn(2, 3, 96, 48), torch.randn(2, 3, 96, 48))
    (outputs['permutations'].sum() + outputs['embeddings'].sum()).backward()
    optimizer.step()  # the momentum buffers exist, as after an epoch
    state = engine.training_state(1, argparse.Namespace(), model=model, optimizer=optimizer)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'state.t'
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            utils.save_checkpoint(state, path)
            seconds.append(time.perf_counter() - start)
        alone = operators_per_second(lambda: time.perf_counter() - start < 1.0 + seconds[-1])
        writer = utils.BackgroundWriter()
        start = time.perf_counter()
        writer.write(state, path)
        during = operators_per_second(lambda: not writer.pending.done())
        in_background = time.perf_counter() - start
        writer.close()
        size = path.stat().st_size
    print(f'{args.arch} MMGL state (--pcc --part, SGD momentum): {size / 1e6:.0f} MB\n'
          f'torch.save in the main thread: {statistics.median(seconds):.2f} s (median of {args.repeats}: '
          f'{", ".join(f"{value:.2f}" for value in seconds)})\n'
          f'the main thread, small operators a second: {alone:,.0f} alone, {during:,.0f} '
          f'({100 * during / alone:.0f}%) during the {in_background:.2f} s of a background write')


if __name__ == '__main__':
    utils.run_main(main)
