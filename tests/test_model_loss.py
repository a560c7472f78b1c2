"""The MMGL network and its pretext-task losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import (cycle_contrastive_loss, decode_permutations, figure_contrastive_loss, permutation_accuracy,
                  permutation_loss, permutation_matrices, random_permutations, shuffle_stripes, soft_neighbours)
from model import MMGLNet, TwoStreamBackbone, backbone_state_dict, mmgl_config, sinkhorn
from tests.helpers import public_agw_backbone_keys

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


def test_one_stream_stem_trains_on_the_statistics_it_evaluates_with():
    """In training mode the shared stem normalises both modalities with the statistics of the mixed
    batch, the ones its running averages keep for evaluation; per-modality statistics in training
    and mixed ones in evaluation cost one-stream most of its infrared accuracy at full size."""
    torch.manual_seed(0)
    model = TwoStreamBackbone('resnet18', 'one').train()
    stem = model.visible_module.visible
    visible, thermal = torch.randn(4, 3, 32, 16), torch.randn(4, 3, 32, 16) * 3 + 2  # unlike modalities
    stem.bn1.momentum = None  # cumulative average: the running statistics are the batches' own
    training = model.stems(visible, thermal)
    model.eval()
    evaluation = torch.cat((model.stems(visible, None, modal=1), model.stems(None, thermal, modal=2)))
    # equal up to the running variance being the unbiased estimate (n / (n - 1), n = 1024 values a channel)
    assert torch.allclose(training, evaluation, atol=1e-2)


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


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_part_embeddings_are_normalised_in_float32_under_autocast(dtype):
    """A part whose projection is all zero (every channel below zero before the ReLU) gives a zero
    embedding, not NaN: under the CPU's float16 autocast F.normalize's eps underflows and 0 / 0 would
    be NaN. The embeddings come in float32, as GPU autocast (which runs norm in float32) gives them."""
    model = MMGLNet('resnet18', 'two', num_stripe=6, part=True).train()
    feature_map = torch.randn(4, model.pool_dim, 6, 3)
    with torch.autocast('cpu', dtype=dtype):
        unit = model.part_embeddings(feature_map)
        with torch.no_grad():
            model.local_conv_list[2][1].bias.fill_(-100.0)  # part 2's batch norm shifts every channel below zero
        embeddings = model.part_embeddings(feature_map)
    assert unit.dtype == torch.float32 and torch.allclose(unit.norm(dim=2), torch.ones(4, 6), atol=1e-5)
    assert embeddings.dtype == torch.float32 and torch.equal(embeddings[:, 2], torch.zeros(4, 256))
    assert torch.allclose(embeddings[:, [0, 1, 3, 4, 5]], unit[:, [0, 1, 3, 4, 5]])


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


def test_sinkhorn_is_alternate_row_and_column_normalisation_in_log_space_with_its_gradient():
    """log_softmax is x - logsumexp(x): the textbook iteration, in values and gradients."""
    def textbook(logits, num_iter, tau):
        log_alpha = logits / tau
        for _ in range(num_iter):
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=2, keepdim=True)
            log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
        return log_alpha.exp()

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 6, 6, generator=generator, dtype=torch.float64) * 3
    upstream = torch.randn(16, 6, 6, generator=generator, dtype=torch.float64)
    for num_iter, tau in ((20, 1.0), (5, 0.3)):
        ours, reference = scores.clone().requires_grad_(), scores.clone().requires_grad_()
        matrices, expected = sinkhorn(ours, num_iter, tau), textbook(reference, num_iter, tau)
        torch.autograd.backward((matrices, expected), (upstream, upstream))
        assert torch.allclose(matrices, expected, rtol=0, atol=1e-12)
        assert torch.allclose(ours.grad, reference.grad, rtol=0, atol=1e-12)
        assert ours.grad.abs().max() > 1e-3  # a gradient that reaches the scores


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


def test_permutation_loss_kinds():
    generator = torch.Generator().manual_seed(3)
    permutations = random_permutations(4, 6, generator=generator)
    predicted = sinkhorn(torch.randn(4, 6, 6, generator=generator))
    mean = permutation_loss(predicted, permutations, 'mse')
    assert torch.allclose(permutation_loss(predicted, permutations, 'mse_sum'), 36 * mean)
    true_entries = torch.stack([predicted[b, k, permutations[b, k]] for b in range(4) for k in range(6)])
    assert torch.allclose(permutation_loss(predicted, permutations, 'ce'), -true_entries.log().mean())
    perfect = permutation_matrices(permutations)
    for kind in ('mse', 'mse_sum', 'ce'):
        assert permutation_loss(perfect, permutations, kind).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match='kind'):
        permutation_loss(predicted, permutations, 'l1')


def test_decoding_ignores_the_sinkhorn_temperature():
    scores = torch.randn(20, 6, 6, generator=torch.Generator().manual_seed(4))
    decoded = decode_permutations(sinkhorn(scores, num_iter=200, tau=1.0))
    for tau in (0.1, 3.0):
        assert torch.equal(decode_permutations(sinkhorn(scores, num_iter=200, tau=tau)), decoded)


def test_figure_pcc_prefers_a_consistent_batch():
    """Four people, each in two visible and two infrared images of three parts: a visible part finds
    the same part of the same person among the infrared parts and in the person's other visible
    image, so the two soft neighbours agree. An infrared batch of other people breaks that."""
    generator = torch.Generator().manual_seed(5)
    people, parts, dim = 4, 3, 32

    def images_of(centres):
        return F.normalize(centres.repeat_interleave(2, dim=0) + 0.05 * torch.randn(2 * people, parts, dim,
                                                                                     generator=generator), dim=2)
    centres = F.normalize(torch.randn(people, parts, dim, generator=generator), dim=2)
    visible, thermal = images_of(centres), images_of(centres)
    others = images_of(F.normalize(torch.randn(people, parts, dim, generator=generator), dim=2))
    consistent = figure_contrastive_loss(visible.flatten(0, 1), thermal.flatten(0, 1), parts)
    inconsistent = figure_contrastive_loss(visible.flatten(0, 1), others.flatten(0, 1), parts)
    assert consistent < inconsistent
    # symmetric in the modalities, and differentiable
    assert torch.allclose(figure_contrastive_loss(thermal.flatten(0, 1), visible.flatten(0, 1), parts), consistent)
    queries = visible.flatten(0, 1).clone().requires_grad_(True)
    figure_contrastive_loss(queries, thermal.flatten(0, 1), parts).backward()
    assert torch.isfinite(queries.grad).all() and queries.grad.abs().sum() > 0


def test_soft_neighbours_skip_excluded_keys():
    keys = torch.eye(3)
    queries = torch.tensor([[1.0, 0.0, 0.0]])
    nearest = soft_neighbours(queries, keys, temperature=0.01)
    assert torch.allclose(nearest, keys[:1], atol=1e-4)
    excluded = soft_neighbours(queries, keys, temperature=0.01, exclude=torch.tensor([[True, False, False]]))
    assert torch.allclose(excluded.norm(dim=1), torch.ones(1)) and excluded[0, 0].abs() < 1e-4


@pytest.mark.parametrize('perm_input, perm_bn', [('gap', False), ('parts', False), ('parts', True)])
def test_permutation_head_input_and_config_round_trip(perm_input, perm_bn):
    model = MMGLNet('resnet18', 'two', num_stripe=4, part=False, perm_input=perm_input, perm_bn=perm_bn)
    assert model.fc1.in_features == 512 * (4 if perm_input == 'parts' else 1)
    assert (model.perm_bn is not None) == perm_bn
    assert mmgl_config(model.state_dict()) == {'arch': 'resnet18', 'num_stripe': 4, 'part': False,
                                               'perm_input': perm_input, 'perm_bn': perm_bn}
    assert not any(key.startswith(('fc1.', 'perm_bn.')) for key in backbone_state_dict(model.state_dict()))
    outputs = model(torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32))
    assert outputs['permutations'].shape == (4, 4, 4)


def test_parts_input_sees_where_each_stripe_lies():
    """With the part-pooled input, moving content from one height to another changes the head's
    input; with the global average it cannot (a map that is constant along the width)."""
    feature_map = torch.zeros(1, 512, 4, 2)
    feature_map[:, :, 0] = 1.0
    moved = feature_map.roll(1, dims=2)
    for perm_input, differs in (('parts', True), ('gap', False)):
        model = MMGLNet('resnet18', 'two', num_stripe=4, part=False, perm_input=perm_input).eval()
        with torch.no_grad():
            assert (not torch.allclose(model.permutation_head(feature_map), model.permutation_head(moved))) == differs


def test_pcc_gradient_reaches_the_backbone_in_the_share_asked_for():
    """embedding_grad_scale 0 (--pcc_grad heads): the shared stages learn from permutation recovery
    alone; 1 (the paper's --pcc_grad backbone): PCC adds its whole gradient; 0.1 (--pcc_grad_scale
    0.1): a tenth of it, while the part projections get all of theirs."""
    generator = torch.Generator().manual_seed(6)
    visible, thermal = torch.randn(4, 3, 48, 24, generator=generator), torch.randn(4, 3, 48, 24, generator=generator)
    permutations = torch.cat([random_permutations(4, 6, generator=generator)] * 2)
    model = MMGLNet('resnet18', 'two', num_stripe=6, part=True)

    def gradients(pcc_weight, embedding_grad_scale):
        model.zero_grad()
        outputs = model(visible, thermal, embedding_grad_scale=embedding_grad_scale)
        embeddings = outputs['embeddings']
        loss = permutation_loss(outputs['permutations'], permutations) + pcc_weight * cycle_contrastive_loss(
            embeddings[:4].flatten(0, 1), embeddings[4:].flatten(0, 1))
        loss.backward()
        backbone = torch.cat([parameter.grad.flatten() for parameter in model.base_resnet.parameters()])
        projections = torch.cat([parameter.grad.flatten() for parameter in model.local_conv_list.parameters()])
        return backbone, projections

    alone, _ = gradients(0.0, 1.0)
    heads_only, projections = gradients(0.5, 0.0)
    assert torch.allclose(heads_only, alone, rtol=1e-5, atol=1e-9)
    assert projections.abs().sum() > 0
    whole, whole_projections = gradients(0.5, 1.0)
    assert not torch.allclose(whole, alone, rtol=1e-3, atol=1e-6)
    tenth, tenth_projections = gradients(0.5, 0.1)
    assert torch.allclose(tenth, alone + 0.1 * (whole - alone), rtol=1e-4, atol=1e-7)
    assert torch.allclose(tenth_projections, whole_projections, rtol=1e-4, atol=1e-7)
    assert torch.allclose(projections, whole_projections, rtol=1e-4, atol=1e-7)
