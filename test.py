"""Judge an MMGL pre-training checkpoint, with no fine-tuning:

(a) permutation recovery on the test images, stripes shuffled with seeded permutations;
(b) zero-shot cross-modality retrieval with the backbone's pooled features, under the standard
    protocol (SYSU-MM01: infrared queries, 10 visible gallery trials averaged; RegDB: one trial),
    with the test-time tools of retrieval_tools.py for the retrieval (--flip, --rerank, --visualize N,
    --save_features FILE).

    python test.py --dataset sysu --resume sysu_mmgl_two_resnet50_s6_pcc_part_lr_0.1_seed_0_epoch_100.t
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import options
import retrieval_tools
import utils
from data_loader import TestData, prepare_dataset, test_transform
from eval_metrics import average_results, regdb_retrieval_set, summarize, sysu_retrieval_set
from loss import permutation_accuracy, random_permutations, shuffle_stripes
from model import MMGLNet, mmgl_config


def get_args_parser():
    parser = argparse.ArgumentParser(description='Evaluate an MMGL pre-training checkpoint',
                                     parents=[options.data_flags(), options.evaluation_flags()])
    parser.add_argument('--resume', required=True, help='checkpoint: a path, or a file name in --model_path')
    parser.add_argument('--model_path', default='save_model/')
    parser.add_argument('--trial', default=1, type=int, help='RegDB split (1..10)')
    parser.add_argument('--tvsearch', action='store_true', help='RegDB: thermal queries, visible gallery')
    parser.add_argument('--seed', default=0, type=int, help='seed of the test permutations')
    retrieval_tools.add_test_time_flags(parser)
    return parser


def load_model(args, device):
    """An MMGLNet built to the checkpoint's shape and filled from it; errors name the file."""
    path = utils.find_checkpoint(args.resume, args.model_path)
    state = utils.load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']  # a training-state file of train.py
    if not isinstance(state, dict):
        raise utils.UserError(f'{path} holds a {type(state).__name__}, not a state dict of MMGL pre-training.')
    try:
        config = mmgl_config(state)
    except ValueError as error:
        raise utils.UserError(f'{path} is not an MMGL pre-training checkpoint: {error}')
    if args.img_h % config['num_stripe']:
        raise utils.UserError(f'--img_h {args.img_h} is not divisible by the {config["num_stripe"]} stripes '
                              f'of {path}.')
    model = MMGLNet(stream='two', **config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise utils.UserError(f'{path} does not fit an MMGL {config["arch"]} network: {error}')
    print(f'loaded {path}: {config["arch"]}, {config["num_stripe"]} stripes, '
          f'{"part" if config["part"] else "global"} embeddings, permutation head on {config["perm_input"]}')
    return model.to(device).eval()


def main(argv=None):
    """Evaluate; returns {'perm_exact', 'perm_stripe', 'cmc', 'mAP', 'mINP'} (permutation rates over both modalities)."""
    args = get_args_parser().parse_args(argv)
    retrieval_tools.check_test_time_flags(args)
    device = utils.select_device(args.gpu)
    data_path = prepare_dataset(args.dataset, args.data_path)
    model = load_model(args, device)
    transform = test_transform(args.img_h, args.img_w)

    def loader(paths):
        dataset = TestData(paths, np.zeros(len(paths), dtype=np.int64), transform, img_size=(args.img_w, args.img_h))
        return DataLoader(dataset, batch_size=args.test_batch, shuffle=False, num_workers=args.workers)

    generator = torch.Generator().manual_seed(args.seed)
    recovered = {}  # modality -> (predicted (N, S, S), true (N, S))

    def extract(paths, modal):
        """Pooled backbone features (zero-shot retrieval; flip-averaged with --flip) and, on the same
        images, permutation recovery (never flipped)."""
        def pooled_features(images):
            return F.normalize(model.feature_map(images, images, modal).mean(dim=(2, 3)), dim=1)
        retrieval_features = retrieval_tools.mirror_averaged(pooled_features) if args.flip else pooled_features

        def forward(images):
            permutations = random_permutations(len(images), model.num_stripe, generator).to(device)
            shuffled = shuffle_stripes(images, permutations)
            predicted = model.permutation_head(model.feature_map(shuffled, shuffled, modal))
            return retrieval_features(images), predicted.flatten(1), permutations
        pooled, predicted, permutations = utils.extract_features(forward, loader(paths), device)
        recovered.setdefault(modal, []).append((predicted, permutations))
        return {'pool': pooled}

    with torch.no_grad():
        if args.dataset == 'regdb':
            retrieval_set = regdb_retrieval_set(extract, data_path, args.trial, args.tvsearch)
        else:
            retrieval_set = sysu_retrieval_set(extract, data_path, args.mode, 'single', trials=range(10))
    distance = retrieval_tools.ranking_distance(args, device)
    results = retrieval_set.evaluate(distance)

    chance = 1 / math.factorial(model.num_stripe)
    for modal, name in ((1, 'visible'), (2, 'infrared'), ((1, 2), 'both')):
        modals = modal if isinstance(modal, tuple) else (modal,)
        batches = [batch for m in modals for batch in recovered[m]]
        predicted = torch.from_numpy(np.concatenate([p for p, _ in batches]))
        permutations = torch.from_numpy(np.concatenate([t for _, t in batches])).long()
        exact, per_stripe = map(float, permutation_accuracy(predicted.view(len(predicted), model.num_stripe, -1),
                                                            permutations))
        print(f'permutation recovery, {name} ({len(predicted)} images): exact {100 * exact:.2f}% '
              f'(chance {100 * chance:.2f}%), per stripe {100 * per_stripe:.2f}% (chance {100 / model.num_stripe:.2f}%)')
    cmc, mAP, mINP = average_results(results['pool'])
    print(f'zero-shot retrieval ({"10 trials averaged" if args.dataset != "regdb" else f"trial {args.trial}"}'
          f'{retrieval_tools.describe(args)}): {summarize(cmc, mAP, mINP)}')
    retrieval_tools.write_outputs(args, retrieval_set, distance, retrieval_tools.output_name(args.resume, args),
                                  split=args.trial if args.dataset == 'regdb' else None)
    return {'perm_exact': exact, 'perm_stripe': per_stripe, 'cmc': cmc, 'mAP': mAP, 'mINP': mINP}


if __name__ == '__main__':
    utils.run_main(main)
