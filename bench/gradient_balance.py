"""How hard does each pretext loss pull on the shared backbone? Gradient norms at initialisation.

For one batch of stripe-shuffled training images (8 visible + 8 infrared), prints each loss and the
norm of its gradient with respect to the shared ResNet stages (base_resnet), for the permutation
losses and for the two PCC forms at the paper's weight 0.5. A loss whose gradient is many times
larger takes the backbone over.

    python bench/gradient_balance.py --dataset synthetic --img_h 96 --img_w 48
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import utils  # noqa: E402
from data_loader import SYSUData, UnpairedSampler, prepare_dataset, train_transform  # noqa: E402
from loss import (cycle_contrastive_loss, figure_contrastive_loss, permutation_loss, random_permutations,  # noqa: E402
                  shuffle_stripes)
from model import ARCHS, PERM_INPUTS, MMGLNet  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description='Backbone gradient norms of the pretext losses at initialisation')
    parser.add_argument('--dataset', default='synthetic', choices=['sysu', 'synthetic'])
    parser.add_argument('--data_path', default=None)
    parser.add_argument('--archs', default='resnet18,resnet50')
    parser.add_argument('--perm_input', default='parts', choices=PERM_INPUTS)
    parser.add_argument('--img_h', default=96, type=int)
    parser.add_argument('--img_w', default=48, type=int)
    parser.add_argument('--batch-size', default=8, type=int, dest='batch_size')
    parser.add_argument('--seed', default=0, type=int)
    args = parser.parse_args(argv)

    utils.set_seed(args.seed)
    trainset = SYSUData(prepare_dataset(args.dataset, args.data_path), train_transform(args.img_h, args.img_w))
    sampler = UnpairedSampler(len(trainset.visible_labels), len(trainset.thermal_labels))
    visible, thermal, _, _ = next(iter(DataLoader(trainset, batch_size=args.batch_size, sampler=sampler)))
    permutations = random_permutations(len(visible), 6)
    visible, thermal = shuffle_stripes(visible, permutations), shuffle_stripes(thermal, permutations)
    permutations = torch.cat((permutations, permutations))

    print('| arch | loss | value | backbone gradient norm |\n|---|---|---|---|')
    for arch in args.archs.split(','):
        if arch not in ARCHS:
            raise utils.UserError(f'--archs: {arch!r} is not one of {ARCHS}.')
        model = MMGLNet(arch, 'two', 6, part=True, perm_input=args.perm_input)
        outputs = model(visible, thermal)
        embeddings = outputs['embeddings']
        visible_parts, thermal_parts = embeddings[:len(visible)].flatten(0, 1), embeddings[len(visible):].flatten(0, 1)
        losses = {f'permutation {kind}': permutation_loss(outputs['permutations'], permutations, kind)
                  for kind in ('mse', 'mse_sum', 'ce')}
        losses['0.5 x PCC cycle'] = 0.5 * cycle_contrastive_loss(visible_parts, thermal_parts)
        losses['0.5 x PCC figure'] = 0.5 * figure_contrastive_loss(visible_parts, thermal_parts, 6)
        backbone = list(model.base_resnet.parameters())
        for name, loss in losses.items():
            gradients = torch.autograd.grad(loss, backbone, retain_graph=True)
            norm = torch.sqrt(sum(gradient.pow(2).sum() for gradient in gradients)).item()
            print(f'| {arch} | {name} | {loss.item():.4f} | {norm:.3g} |')


if __name__ == '__main__':
    utils.run_main(main)
