"""Evaluating fine-tuned networks: the test protocol around a network, and most of a test script.

    Evaluator                           test images -> features (a RetrievalSet) -> (CMC, mAP, mINP) per named feature
    score_lines(scores)                 'NAME: Rank-1 ...' lines
    load_finetuned(path, build_net)     a fine-tuned network, loaded strictly
    test_args_parser(description)       the flags every fine-tuned test script has (public names and defaults)
    run_test(args, build_net, feature_names, default_checkpoint)
                                        checkpoint(s), trials, report, averages, and the test-time tools of
                                        retrieval_tools.py (--rerank, --flip, ...)
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import options
import retrieval_tools
import utils
from data_loader import TestData, prepare_dataset, test_transform
from eval_metrics import average_results, regdb_retrieval_set, summarize, sysu_retrieval_set
from model import ARCHS, BACKBONE_PREFIXES, checkpoint_arch


def test_args_parser(description):
    """An argparse parser with the flags shared by the fine-tuned test scripts. The naming flags
    (--lr, --optim, --num_pos, --batch-size, --seed, --stream, with the method's own) rebuild the
    training run's name, which gives the default checkpoint <run>_best.t when --resume is not given."""
    parser = argparse.ArgumentParser(description=description, parents=[options.data_flags(), options.evaluation_flags()])
    parser.add_argument('--resume', '-r', default='',
                        help='fine-tuned checkpoint: a path, or a file name in --model_path; for RegDB "{trial}" '
                             'in it stands for the trial number. Default: the <run>_best.t name the training '
                             'flags give')
    parser.add_argument('--model_path', default='save_model/')
    parser.add_argument('--arch', default=None, choices=ARCHS, help='default: read from the checkpoint')
    parser.add_argument('--shot', default='single', choices=['single', 'multi'], help='SYSU-MM01 gallery')
    parser.add_argument('--trial', default=0, type=int,
                        help='RegDB: test the checkpoint of split K (1..10), or 0: all ten, averaged '
                             '(SYSU-MM01 always averages its 10 gallery draws)')
    parser.add_argument('--tvsearch', action='store_true', help='RegDB: thermal queries, visible gallery')
    naming = parser.add_argument_group('training flags that name the default checkpoint')
    naming.add_argument('--lr', default=0.1, type=float)
    naming.add_argument('--optim', default='sgd', choices=['sgd', 'adam'])
    naming.add_argument('--num_pos', default=4, type=int)
    naming.add_argument('--batch-size', default=8, type=int, dest='batch_size')
    naming.add_argument('--seed', default=0, type=int)
    naming.add_argument('--stream', default='two', choices=['one', 'two'])
    retrieval_tools.add_test_time_flags(parser)
    return parser


def load_finetuned(path, build_net, arch=None, unused_prefixes=()):
    """A fine-tuned network from `path` ({'net': state dict, ...} or a plain state dict), strictly.

    build_net(class_num, arch) builds the unloaded network; class_num is read from the checkpoint's
    classifier.weight, the arch from its backbone (a different `arch` asked for is a UserError).
    Besides keys starting with `unused_prefixes`, only backbone-named tensors the network has no
    place for may be left over (the whole-ResNet leftovers of public checkpoints); any other
    mismatch (e.g. another --method) is a UserError. Returns (network on the CPU, checkpoint dict).
    """
    checkpoint = utils.load_checkpoint(path)
    state = checkpoint.get('net') if isinstance(checkpoint, dict) and isinstance(checkpoint.get('net'), dict) \
        else checkpoint
    if not isinstance(state, dict) or 'classifier.weight' not in utils.strip_data_parallel(state):
        raise utils.UserError(f'{path} is not a fine-tuned checkpoint (it has no classifier.weight): pass the '
                              f'<run>_best.t or <run>_epoch_N.t file of a fine-tuning run, not a pre-training one.')
    state = utils.strip_data_parallel(state)
    found_arch = checkpoint_arch(state)
    if arch and found_arch and arch != found_arch:
        raise utils.UserError(f'{path} holds a {found_arch} network, not --arch {arch}: drop --arch or pass {found_arch}.')
    net = build_net(int(state['classifier.weight'].shape[0]), found_arch or arch or 'resnet50')
    own = net.state_dict()
    left_over = BACKBONE_PREFIXES + tuple(unused_prefixes)
    state = {key: value for key, value in state.items() if key in own or not key.startswith(left_over)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(key for key in set(own) & set(state)
                      if not torch.is_tensor(state[key]) or state[key].shape != own[key].shape)
    if missing or unexpected or reshaped:
        details = '; '.join(what.format(len(keys)) + f', e.g. {", ".join(keys[:3])}'
                            for what, keys in (('lacks {} tensors', missing), ('has {} unknown tensors', unexpected),
                                               ('has {} tensors of other shapes', reshaped)) if keys)
        raise utils.UserError(f'{path} does not fit the network built for it: it {details}. '
                              f'Check the network flags (AGW: --method; DDAG: --wpa, --part, --low-dim, '
                              f'--nheads) against the training run.')
    net.load_state_dict(state)
    return net, (checkpoint if isinstance(checkpoint, dict) and 'net' in checkpoint else {})


class Evaluator:
    """The standard test protocol around a network: SYSU-MM01 (and synthetic) infrared queries
    against visible galleries, RegDB visible queries against the thermal gallery of split `trial`
    (thermal to visible with tvsearch).

    The network's eval-mode forward `net(x, x, modal)` returns one (B, D) feature per name in
    feature_names (L2-normalised: compared by inner product). With flip, each is averaged with that
    of the mirrored image (retrieval_tools.mirror_averaged). Test images are loaded once and kept.
    """

    def __init__(self, dataset, data_path, device, feature_names, img_h=288, img_w=144, test_batch=64, workers=4,
                 mode='all', shot='single', trial=1, tvsearch=False, flip=False):
        self.dataset, self.data_path, self.device = dataset, Path(data_path), device
        self.feature_names = tuple(feature_names)
        self.img_h, self.img_w, self.test_batch, self.workers = img_h, img_w, test_batch, workers
        self.mode, self.shot, self.trial, self.tvsearch, self.flip = mode, shot, trial, tvsearch, flip
        self.transform = test_transform(img_h, img_w)
        self._images = {}

    @classmethod
    def from_args(cls, args, data_path, device, feature_names, **overrides):
        options = dict(img_h=args.img_h, img_w=args.img_w, test_batch=args.test_batch, workers=args.workers,
                       mode=args.mode, shot=getattr(args, 'shot', 'single'), trial=args.trial,
                       tvsearch=getattr(args, 'tvsearch', False), flip=getattr(args, 'flip', False))
        options.update(overrides)
        return cls(args.dataset, data_path, device, feature_names, **options)

    def images(self, paths):
        key = tuple(paths)
        if key not in self._images:
            self._images[key] = TestData(paths, np.zeros(len(paths), dtype=np.int64), self.transform,
                                         img_size=(self.img_w, self.img_h))
        return self._images[key]

    def extractor(self, net):
        """extract(paths, modal) -> {feature name: (N, D) float32 array}, what eval_metrics wants."""
        def extract(paths, modal):
            loader = DataLoader(self.images(paths), batch_size=self.test_batch, shuffle=False,
                                num_workers=self.workers, pin_memory=self.device.type == 'cuda')
            def features_of(images):
                return net(images, images, modal)
            forward = retrieval_tools.mirror_averaged(features_of) if self.flip else features_of
            features = utils.extract_features(forward, loader, self.device)
            if len(features) != len(self.feature_names):
                raise ValueError(f'the network gives {len(features)} features, expected {self.feature_names}')
            return dict(zip(self.feature_names, features))
        return extract

    def retrieval_set(self, net, gallery_trials=(0,)):
        """The test images' features and labels (eval_metrics.RetrievalSet): SYSU-MM01 one trial per
        gallery draw in gallery_trials, RegDB one (split self.trial). Leaves the network's train/eval
        mode and every random generator as they were, so evaluating never changes a training run."""
        was_training, rng = net.training, utils.rng_state()
        net.eval()
        try:
            extract = self.extractor(net)
            if self.dataset == 'regdb':
                return regdb_retrieval_set(extract, self.data_path, self.trial, self.tvsearch)
            return sysu_retrieval_set(extract, self.data_path, self.mode, self.shot, trials=gallery_trials)
        finally:
            utils.set_rng_state(rng)
            net.train(was_training)

    def evaluate(self, net, gallery_trials=(0,)):
        """{feature name: [(cmc, mAP, mINP) per trial]} of retrieval_set, ranked by -q.g."""
        return self.retrieval_set(net, gallery_trials).evaluate()


def score_lines(scores, width=None):
    """'NAME: Rank-1 ...' lines for {feature name: (cmc, mAP, mINP)}."""
    width = width or max(len(name) for name in scores) + 1
    return [f'{(name.upper() + ":"):{width + 1}s} {summarize(*result)}' for name, result in scores.items()]


def run_test(args, build_net, feature_names, default_checkpoint, unused_prefixes=()):
    """Most of a test script. build_net(class_num, arch) -> unloaded network whose eval forward gives
    one feature per name in feature_names. default_checkpoint: the file name when --resume is not
    given ('{trial}' standing for the RegDB split).

    SYSU-MM01 / synthetic: one checkpoint, 10 gallery draws (--mode, --shot), each reported, then averaged.
    RegDB: the checkpoint of split --trial, or with --trial 0 of each split 1..10, averaged.
    The test-time flags of retrieval_tools (--flip, --rerank, --visualize, --save_features) apply to
    every checkpoint tested.
    Returns {feature name: {'trials': [(cmc, mAP, mINP), ...], 'cmc', 'mAP', 'mINP' (averages)}}.
    """
    if args.dataset == 'regdb' and not 0 <= args.trial <= 10:
        raise utils.UserError(f'--trial {args.trial}: RegDB has splits 1..10 (0 tests all ten).')
    retrieval_tools.check_test_time_flags(args)
    pattern = args.resume or default_checkpoint
    if args.dataset == 'regdb':
        trials = list(range(1, 11)) if args.trial == 0 else [args.trial]
        if len(trials) > 1 and '{trial}' not in pattern:
            raise utils.UserError('--trial 0 tests the ten RegDB splits, each with its own checkpoint: write '
                                  '"{trial}" in --resume where the split number goes (e.g. '
                                  'regdb_agw_p4_n8_lr_0.1_seed_0_trial_{trial}_best.t), or pass --trial K.')
        files = {trial: pattern.replace('{trial}', str(trial)) for trial in trials}
    else:
        files = {None: pattern}
    paths = {trial: utils.find_checkpoint(name, args.model_path) for trial, name in files.items()}
    device = utils.select_device(args.gpu)
    data_path = prepare_dataset(args.dataset, args.data_path)
    distance = retrieval_tools.ranking_distance(args, device)

    per_trial = {name: [] for name in feature_names}
    for trial, path in paths.items():
        net, checkpoint = load_finetuned(path, build_net, args.arch, unused_prefixes)
        net = net.to(device).eval()
        recorded = f', epoch {checkpoint["epoch"]}' if 'epoch' in checkpoint else ''
        print(f'==> loaded {path} ({net.arch}, {net.classifier.out_features} training identities{recorded})')
        if args.dataset == 'regdb':
            evaluator = Evaluator.from_args(args, data_path, device, feature_names, trial=trial)
            retrieval_set = evaluator.retrieval_set(net)
            labels = [f'Test Trial: {trial}']
        else:
            evaluator = Evaluator.from_args(args, data_path, device, feature_names)
            retrieval_set = evaluator.retrieval_set(net, gallery_trials=range(10))
            labels = [f'Test Trial: {index}' for index in range(10)]
        results = retrieval_set.evaluate(distance)
        for index, label in enumerate(labels):
            print(label)
            for line in score_lines({name: results[name][index] for name in feature_names}):
                print('  ' + line)
        for name in feature_names:
            per_trial[name].extend(results[name])
        retrieval_tools.write_outputs(args, retrieval_set, distance, retrieval_tools.output_name(path, args),
                                      split=trial)

    summary = {}
    for name in feature_names:
        cmc, mAP, mINP = average_results(per_trial[name])
        summary[name] = {'trials': per_trial[name], 'cmc': cmc, 'mAP': mAP, 'mINP': mINP}
    count = len(per_trial[feature_names[0]])
    direction = 'thermal to visible' if args.dataset == 'regdb' and args.tvsearch else (
        'visible to thermal' if args.dataset == 'regdb' else f'infrared to visible, {args.mode} search, {args.shot}-shot')
    print(f'All Average ({count} trial{"s" if count > 1 else ""}, {direction}{retrieval_tools.describe(args)}):')
    for line in score_lines({name: (s['cmc'], s['mAP'], s['mINP']) for name, s in summary.items()}):
        print('  ' + line)
    return summary
