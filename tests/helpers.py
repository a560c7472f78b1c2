"""What several test files use: run arguments, key lists of the public networks, and checks the AGW
and DDAG tests both make. Not a test file: pytest collects nothing here."""
import numpy as np
import torch

import data_loader
from data_manager import process_gallery_sysu, process_query_sysu
from eval_metrics import average_results, eval_sysu
from model import BACKBONE_PREFIXES, MMGLNet, backbone_state_dict

# Image size of the script runs in the tests: (--img_h, --img_w) = (48, 24).
SIZE = ('--img_h', '48', '--img_w', '24')


def run_args(tmp_path, data_path, *extra, dataset='synthetic'):
    """The flags of a short training run on CPU whose files all go under tmp_path."""
    return ['--dataset', dataset, '--data_path', str(data_path), *SIZE, '--workers', '0',
            '--model_path', str(tmp_path / 'save_model'), '--log_path', str(tmp_path / 'log'),
            '--vis_log_path', str(tmp_path / 'log' / 'vis'), *extra]


def eval_args(data_path, *extra, dataset='synthetic'):
    """The flags of a test script run at the tests' image size."""
    return ['--dataset', dataset, '--data_path', str(data_path), *SIZE, '--workers', '0', *extra]


def randomised(state):
    """The state dict with every floating-point tensor filled in place with values no fresh network has."""
    for value in state.values():
        if value.is_floating_point():
            value.uniform_()
    return state


def backbone_keys(net):
    return sorted(key for key in net.state_dict() if key.startswith(BACKBONE_PREFIXES))


BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def public_agw_backbone_keys(blocks=(3, 4, 6, 3)):
    """The backbone keys the public AGW/DDAG networks use, written out from their module names:
    a stem per modality (visible_module.visible / thermal_module.thermal) and the shared
    base_resnet.base.layer1..4 of ResNet-50 bottlenecks."""
    keys = set()
    for stem in ('visible_module.visible', 'thermal_module.thermal'):
        keys.add(f'{stem}.conv1.weight')
        keys.update(f'{stem}.bn1.{name}' for name in BN_KEYS)
    for layer, num_blocks in enumerate(blocks, start=1):
        for block in range(num_blocks):
            prefix = f'base_resnet.base.layer{layer}.{block}'
            for index in (1, 2, 3):
                keys.add(f'{prefix}.conv{index}.weight')
                keys.update(f'{prefix}.bn{index}.{name}' for name in BN_KEYS)
            if block == 0:
                keys.add(f'{prefix}.downsample.0.weight')
                keys.update(f'{prefix}.downsample.1.{name}' for name in BN_KEYS)
    return keys


def assert_mmgl_backbone_fills_every_backbone_tensor(build_net, stream, heads):
    """An MMGL ResNet-50 state dict of random values loads into build_net(stream) both the public
    way (non-strict, only the network's own `heads` missing) and through load_backbone, which fills
    every backbone tensor and leaves the heads as they were."""
    pretrained = randomised(MMGLNet('resnet50', stream).state_dict())

    missing, unexpected = build_net(stream).load_state_dict(backbone_state_dict(pretrained), strict=False)
    assert unexpected == [] and missing and all(key.startswith(heads) for key in missing)

    model = build_net(stream)
    heads_before = {key: value.clone() for key, value in model.state_dict().items() if key.startswith(heads)}
    report = model.load_backbone(pretrained)
    assert set(report.loaded) == public_agw_backbone_keys() and not report.missing and not report.ignored
    state = model.state_dict()
    for key in public_agw_backbone_keys():
        assert torch.equal(state[key], pretrained[key]), key
    for key, value in heads_before.items():
        assert torch.equal(state[key], value), key


def direct_features(net, paths, modal):
    """The eval-mode outputs of `net` computed by hand, one 48x24 image at a time, in the order given."""
    dataset = data_loader.TestData(paths, np.zeros(len(paths)), data_loader.test_transform(48, 24), img_size=(24, 48))
    with torch.no_grad():
        outputs = [net(image[None], image[None], modal) for image, _ in dataset]
    return [torch.cat(column).numpy() for column in zip(*outputs)]


def assert_results_equal_eval_metrics(results, net, data_path, feature_names):
    """A test script's SYSU results (per trial and averaged, for each of the net's two eval features,
    named feature_names) equal eval_sysu on features computed by hand."""
    query_paths, query_pids, query_cams = process_query_sysu(data_path, 'all')
    query = dict(zip(feature_names, direct_features(net, query_paths, 2)))
    expected = {name: [] for name in feature_names}
    for trial in range(10):
        gallery_paths, gallery_pids, gallery_cams = process_gallery_sysu(data_path, 'all', trial, 'single')
        gallery = dict(zip(feature_names, direct_features(net, gallery_paths, 1)))
        for feature in expected:
            distmat = -query[feature] @ gallery[feature].T
            expected[feature].append(eval_sysu(distmat, query_pids, gallery_pids, query_cams, gallery_cams))
    for feature in feature_names:
        assert len(results[feature]['trials']) == 10
        for (cmc, mAP, mINP), (cmc_ref, mAP_ref, mINP_ref) in zip(results[feature]['trials'], expected[feature]):
            assert np.array_equal(cmc, cmc_ref) and mAP == mAP_ref and mINP == mINP_ref
        cmc_ref, mAP_ref, mINP_ref = average_results(expected[feature])
        assert np.array_equal(results[feature]['cmc'], cmc_ref)
        assert (results[feature]['mAP'], results[feature]['mINP']) == (mAP_ref, mINP_ref)
    first, second = feature_names
    assert results[first]['mAP'] != results[second]['mAP']  # two different features, not one twice
