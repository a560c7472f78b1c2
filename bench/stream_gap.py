"""Where a pre-training checkpoint loses permutations: on unseen identities, or in the batch-norm
statistics of its stems.

A one-stream network runs one stem over both modalities. Until commit cfd8882 the training step
called it on the visible and on the infrared batch apart, so each modality was normalised with its
own batch statistics, while the running statistics it kept, which test.py's evaluation uses,
average the two. If such a mismatch is what costs held-out permutations, re-estimating each stem's
batch norm on its own modality's training images recovers them (it did, for the full-size run in
the README); if the loss is on unseen identities, it is also there with those statistics, and the
training identities (judged the same way) stay ahead. The stem now sees both batches at once, so
for new checkpoints the saved statistics are the ones it trained on.

The same question for every batch norm: if a run's training curves are right but its held-out
figures are not (the compiled fast run of the README's Speed section), its weights may be sound and
its running statistics wrong. Re-estimating every batch norm the permutation judge uses, as the
training step runs them (each stem on its modality, the shared stages and the head on both
modalities' batches at once), recovers the held-out figures in that case and not in the other.

Prints, per modality, the exact-match rate of permutation recovery on training images and on the
held-out test images, for the checkpoint as saved (test.py's judge), with each stem's batch norm
re-estimated on its modality (the stems of a one-stream checkpoint are untied for that), and with
every batch norm re-estimated; and how far apart the two modalities' statistics are at the stem
(median over channels of the difference of the means in units of the standard deviation). Images
are not augmented; stripes are shuffled with seeded permutations.

    python bench/stream_gap.py --dataset synthetic --img_h 96 --img_w 48 --resume CHECKPOINT.t
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import options  # noqa: E402
import test as mmgl_test  # noqa: E402
import utils  # noqa: E402
from data_loader import RegDBData, SYSUData, prepare_dataset, test_transform  # noqa: E402
from data_manager import (INFRARED_CAMERAS, VISIBLE_CAMERAS, list_sysu_images, process_test_regdb,  # noqa: E402
                          read_image, read_split_ids)
from loss import permutation_accuracy, random_permutations, shuffle_stripes  # noqa: E402
from study_tools import publish  # noqa: E402

MODALITIES = {1: 'visible', 2: 'infrared'}  # the `modal` numbers of the networks


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], parents=[options.data_flags()])
    parser.add_argument('--resume', required=True, help='MMGL checkpoint: a path, or a file name in --model_path')
    parser.add_argument('--model_path', default='save_model/')
    parser.add_argument('--trial', default=1, type=int, help='RegDB split (1..10)')
    parser.add_argument('--train_images', default=400, type=int,
                        help='training images per modality judged and used for the statistics')
    parser.add_argument('--test-batch', default=64, type=int, dest='test_batch')
    parser.add_argument('--seed', default=0, type=int, help='seed of the image choice and the permutations')
    parser.add_argument('--out', default=None, help='also write the table to this Markdown file')
    return parser


def test_images(args, data_path, transform):
    """{modal: (N, 3, H, W)} of the held-out test identities: every test image of each modality."""
    if args.dataset == 'regdb':
        paths = {modal: process_test_regdb(data_path, args.trial, name)[0]
                 for modal, name in ((1, 'visible'), (2, 'thermal'))}
    else:
        ids = read_split_ids(data_path, 'test')
        paths = {modal: [path for folder in list_sysu_images(data_path, ids, cameras) for path in folder]
                 for modal, cameras in ((1, VISIBLE_CAMERAS), (2, INFRARED_CAMERAS))}
    return {modal: torch.stack([transform(read_image(path, (args.img_w, args.img_h))) for path in modal_paths])
            for modal, modal_paths in paths.items()}


def training_images(args, data_path, transform):
    """{modal: (n, 3, H, W)}: --train_images training images of each modality, drawn with --seed."""
    if args.dataset == 'regdb':
        trainset = RegDBData(data_path, args.trial, transform, img_size=(args.img_w, args.img_h))
    else:
        trainset = SYSUData(data_path, transform)
    draw = np.random.default_rng(args.seed)
    images = {}
    for modal, arrays in ((1, trainset.visible_images), (2, trainset.thermal_images)):
        chosen = draw.choice(len(arrays), min(args.train_images, len(arrays)), replace=False)
        images[modal] = torch.stack([transform(arrays[index]) for index in chosen])
    return images


def shuffled_batches(images, num_stripe, batch_size, seed, device):
    """(shuffled (B, 3, H, W) on the device, permutations (B, S)) batches of the images, seeded."""
    generator = torch.Generator().manual_seed(seed)
    for chunk in images.split(batch_size):
        permutations = random_permutations(len(chunk), num_stripe, generator)
        yield shuffle_stripes(chunk, permutations).to(device), permutations.to(device)


@torch.no_grad()
def exact_rate(model, images, modal, args, device):
    """Exact-match rate of permutation recovery on the images through the stem of `modal`."""
    hits = 0.0
    for shuffled, permutations in shuffled_batches(images, model.num_stripe, args.test_batch, args.seed, device):
        exact, _ = permutation_accuracy(model.permutation_head(model.feature_map(shuffled, shuffled, modal)),
                                        permutations)
        hits += float(exact) * len(permutations)
    return hits / len(images)


def stem_of(model, modal):
    """The ModalityStem that runs the images of `modal` (1 visible, 2 infrared)."""
    return model.visible_module if modal == 1 else model.thermal_module


def stem_norm(model, modal):
    stem = stem_of(model, modal)
    return getattr(stem, stem.modality).bn1


@contextlib.contextmanager
def reestimating(norms):
    """The batch norms' running statistics, reset, become the plain average of the batch statistics of
    what runs inside the block; then the norms are back in evaluation mode."""
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
        norm.train()
    yield
    for norm in norms:
        norm.eval()


@torch.no_grad()
def reestimate_stem_statistics(model, images, args, device):
    """Each stem's batch norm re-estimated on its own modality's shuffled images, in place; the rest of
    the network keeps its statistics."""
    for modal, modal_images in images.items():
        with reestimating([stem_norm(model, modal)]):
            for shuffled, _ in shuffled_batches(modal_images, model.num_stripe, args.test_batch, args.seed + 1, device):
                stem_of(model, modal)(shuffled)


@torch.no_grad()
def reestimate_all_statistics(model, images, args, device):
    """Every batch norm of the backbone and the permutation head re-estimated, in place, as the training
    step runs them: visible and infrared batches of one size through feature_map(visible, infrared) at
    once, then the head; as many images of each modality (the fewer of the two counts). The part
    embeddings' batch norms, which the judge does not use, are left."""
    judged = [model.visible_module, model.thermal_module, model.base_resnet, model.perm_bn]
    norms = [module for part in judged if part is not None for module in part.modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    count = min(len(images[1]), len(images[2]))
    pairs = zip(*(shuffled_batches(images[modal][:count], model.num_stripe, args.test_batch, args.seed + 1, device)
                  for modal in (1, 2)))
    with reestimating(norms):
        for (visible, _), (infrared, _) in pairs:
            model.permutation_head(model.feature_map(visible, infrared))


def statistics_gap(model):
    """Median over the stem's channels of |visible mean - infrared mean| / sqrt(mean of the variances)."""
    visible, infrared = stem_norm(model, 1), stem_norm(model, 2)
    scale = ((visible.running_var + infrared.running_var) / 2).sqrt()
    return float(((visible.running_mean - infrared.running_mean).abs() / scale).median())


def main(argv=None):
    """Returns {'as saved': {(split, modality): rate}, 'stems per modality': {...}, 'every batch norm':
    {...}, 'statistics gap': (as saved, stems re-estimated, every batch norm re-estimated)}."""
    args = get_args_parser().parse_args(argv)
    if args.train_images < 1:
        raise utils.UserError(f'--train_images must be at least 1, got {args.train_images}.')
    device = utils.select_device(args.gpu)
    data_path = prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')
    model = mmgl_test.load_model(args, device)  # two stems, equal when the checkpoint is one-stream
    transform = test_transform(args.img_h, args.img_w)
    splits = {'training': training_images(args, data_path, transform),
              'held-out': test_images(args, data_path, transform)}

    def rates():
        return {(split, MODALITIES[modal]): exact_rate(model, images, modal, args, device)
                for split, by_modal in splits.items() for modal, images in by_modal.items()}

    results, gaps = {'as saved': rates()}, {'as saved': statistics_gap(model)}
    for row, reestimate in (('stems per modality', reestimate_stem_statistics),
                            ('every batch norm', reestimate_all_statistics)):
        reestimate(model, splits['training'], args, device)
        results[row], gaps[row] = rates(), statistics_gap(model)
    results['statistics gap'] = tuple(gaps.values())

    columns = list(results['as saved'])
    lines = [f'{Path(args.resume).name}, {args.img_h}x{args.img_w}: permutation recovery, exact match '
             f'({len(splits["training"][1])} + {len(splits["training"][2])} training images, '
             f'{len(splits["held-out"][1])} + {len(splits["held-out"][2])} held-out)', '',
             '| batch-norm statistics | ' + ' | '.join(f'{split} {modality}' for split, modality in columns)
             + ' | stem statistics gap |', '|---' * (len(columns) + 2) + '|']
    for row, gap in gaps.items():
        lines.append(f'| {row} | ' + ' | '.join(f'{100 * results[row][column]:.1f}%' for column in columns)
                     + f' | {gap:.2f} |')
    publish('\n'.join(lines), args.out)
    return results


if __name__ == '__main__':
    utils.run_main(main)
