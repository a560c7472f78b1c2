"""The MMGL network and its pretext-task losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import (cycle_contrastive_loss, decode_permutations, permutation_accuracy, permutation_loss,
                  permutation_matrices, random_permutations, shuffle_stripes)
from model import MMGLNet, TwoStreamBackbone, backbone_state_dict, sinkhorn

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


@pytest.mark.parametrize('stream', ['one', 'two'])
def test_backbone_keys_are_the_public_agw_names(stream):
    state = TwoStreamBackbone('resnet50', stream).state_dict()
    assert set(state) == public_agw_backbone_keys()
    assert state['visible_module.visible.conv1.weight'].shape == (64, 3, 7, 7)
    assert state['base_resnet.base.layer3.4.conv2.weight'].shape == (256, 256, 3, 3)
    assert state['base_resnet.base.layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)


def test_mmgl_checkpoint_is_backbone_plus_named_heads():
    state = MMGLNet('resnet50', 'two', num_stripe=6, part=True).state_dict()
    heads = set(state) - public_agw_backbone_keys()
    assert heads and all(key.startswith(('fc1.', 'fc2.', 'local_conv_list.')) for key in heads)
    assert state['fc1.weight'].shape == (1024, 2048)
    assert state['fc2.weight'].shape == (36, 1024)
    assert len({key.split('.')[1] for key in heads if key.startswith('local_conv_list')}) == 6
    assert set(backbone_state_dict(state)) == public_agw_backbone_keys()


def test_one_stream_shares_its_stem_between_modalities():
    model = TwoStreamBackbone('resnet18', 'one')
    assert model.visible_module.visible.conv1.weight is model.thermal_module.thermal.conv1.weight
    two = TwoStreamBackbone('resnet18', 'two')
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in two.parameters())


@pytest.mark.parametrize('arch, channels', [('resnet18', 512), ('resnet50', 2048)])
def test_last_stage_has_stride_one(arch, channels):
    model = TwoStreamBackbone(arch).eval()
    with torch.no_grad():
        feature_map = model.feature_map(torch.zeros(1, 3, 288, 144), torch.zeros(2, 3, 288, 144))
    assert feature_map.shape == (3, channels, 18, 9)


def test_mmgl_forward_shapes_with_and_without_parts():
    visible, thermal = torch.randn(3, 3, 96, 48), torch.randn(3, 3, 96, 48)
    for part, num_parts in ((True, 6), (False, 1)):
        outputs = MMGLNet('resnet18', 'two', num_stripe=6, part=part)(visible, thermal)
        assert outputs['permutations'].shape == (6, 6, 6)
        assert outputs['embeddings'].shape == (6, num_parts, 256)
        assert torch.allclose(outputs['embeddings'].norm(dim=2), torch.ones(6, num_parts), atol=1e-5)


def test_sinkhorn_gives_doubly_stochastic_matrices():
    for scale, num_iter in ((1.0, 20), (3.0, 200)):  # sharper scores need more iterations to converge
        matrices = sinkhorn(torch.randn(8, 6, 6, generator=torch.Generator().manual_seed(0)) * scale, num_iter)
        assert (matrices >= 0).all()
        assert torch.allclose(matrices.sum(dim=1), torch.ones(8, 6), atol=1e-3)
        assert torch.allclose(matrices.sum(dim=2), torch.ones(8, 6), atol=1e-3)
    # a low temperature sharpens towards the permutation that the scores favour
    scores = permutation_matrices(torch.tensor([[2, 0, 1]])) * 4
    sharp = sinkhorn(scores, num_iter=50, tau=0.1)
    assert torch.allclose(sharp, permutation_matrices(torch.tensor([[2, 0, 1]])), atol=1e-3)


def test_random_permutations_are_uniform_permutations():
    generator = torch.Generator().manual_seed(0)
    permutations = random_permutations(36000, 3, generator=generator)
    assert (permutations.sort(dim=1).values == torch.arange(3)).all()
    codes = permutations[:, 0] * 9 + permutations[:, 1] * 3 + permutations[:, 2]
    counts = torch.bincount(codes)[codes.unique()]
    assert len(counts) == math.factorial(3)
    assert (counts - 6000).abs().max() < 400  # ~5 standard deviations


def test_shuffle_stripes_moves_whole_stripes():
    # two 6x2 images, 3 stripes of 2 rows each; every pixel holds its image and row number
    images = (torch.arange(2).view(2, 1, 1, 1) * 10 + torch.arange(6).view(1, 1, 6, 1)).float().expand(2, 1, 6, 2)
    permutations = torch.tensor([[2, 0, 1], [0, 1, 2]])
    shuffled = shuffle_stripes(images, permutations)
    assert torch.equal(shuffled[0, :, 0:2], images[0, :, 4:6])
    assert torch.equal(shuffled[0, :, 2:4], images[0, :, 0:2])
    assert torch.equal(shuffled[0, :, 4:6], images[0, :, 2:4])
    assert torch.equal(shuffled[1], images[1])
    # undoing with the inverse permutation restores the images
    assert torch.equal(shuffle_stripes(shuffled, permutations.argsort(dim=1)), images)
    with pytest.raises(ValueError, match='divisible'):
        shuffle_stripes(torch.zeros(1, 3, 10, 4), torch.tensor([[0, 1, 2]]))


def test_hungarian_decoding_and_accuracy():
    generator = torch.Generator().manual_seed(1)
    permutations = random_permutations(50, 6, generator=generator)
    noisy = permutation_matrices(permutations) + 0.3 * torch.rand(50, 6, 6, generator=generator)
    assert torch.equal(decode_permutations(noisy), permutations)
    assert permutation_accuracy(noisy, permutations) == (1.0, 1.0)
    # swap two stripes of the first half of the predictions: 4 of 6 stripes stay right there
    wrong = noisy.clone()
    wrong[:25] = wrong[:25, [1, 0, 2, 3, 4, 5]]
    exact, per_stripe = permutation_accuracy(wrong, permutations)
    assert exact == pytest.approx(0.5)
    assert per_stripe == pytest.approx((25 * 4 / 6 + 25) / 50)
    assert permutation_loss(permutation_matrices(permutations), permutations).item() == 0.0
    assert permutation_loss(wrong, permutations) > permutation_loss(noisy, permutations)


def test_pcc_prefers_cycle_consistent_embeddings():
    generator = torch.Generator().manual_seed(2)
    visible = F.normalize(torch.randn(16, 32, generator=generator), dim=1)
    # infrared embeddings close to their visible counterparts: walking there and back returns home
    thermal = F.normalize(visible + 0.1 * torch.randn(16, 32, generator=generator), dim=1)
    consistent = cycle_contrastive_loss(visible, thermal, temperature=0.07)
    # the same infrared embeddings collapsed pairwise: two visible embeddings reach one neighbour
    collapsed = thermal.clone()
    collapsed[1::2] = collapsed[0::2]
    ambiguous = cycle_contrastive_loss(visible, collapsed, temperature=0.07)
    unrelated = cycle_contrastive_loss(visible, F.normalize(torch.randn(16, 32, generator=generator), dim=1))
    assert consistent < 0.1
    assert consistent < ambiguous
    assert consistent < unrelated
    # the pairing order within a batch does not matter: the images are unpaired
    order = torch.randperm(16, generator=generator)
    assert torch.allclose(cycle_contrastive_loss(visible, thermal[order]), cycle_contrastive_loss(visible, thermal))
    # symmetric in the modalities
    assert torch.allclose(cycle_contrastive_loss(thermal, visible), cycle_contrastive_loss(visible, thermal))
