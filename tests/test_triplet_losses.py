"""The identity triplet losses of AGW and DDAG fine-tuning, against per-anchor references."""
import math

import pytest
import torch

from loss import OriTripletLoss, TripletLoss_WRT, agw_softmax_weights, pairwise_distances


def shuffled_batch(num_ids=6, per_id=4, dim=16, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(num_ids).repeat_interleave(per_id)
    order = torch.randperm(len(targets), generator=generator)
    inputs = scale * torch.randn(len(targets), dim, generator=generator, dtype=torch.float64)
    return inputs[order], targets[order]


def batch_hard_reference(inputs, targets, margin):
    """One anchor at a time: the furthest positive and the closest negative by torch.dist."""
    losses, correct = [], 0
    for i in range(len(inputs)):
        positives = [torch.dist(inputs[i], inputs[j]) for j in range(len(inputs)) if targets[j] == targets[i]]
        negatives = [torch.dist(inputs[i], inputs[j]) for j in range(len(inputs)) if targets[j] != targets[i]]
        furthest, closest = max(positives), min(negatives)
        losses.append(max(0.0, furthest.item() - closest.item() + margin))
        correct += int(closest >= furthest)
    return sum(losses) / len(losses), correct


def weighted_reference(inputs, targets):
    """One anchor at a time, the public weighting: positives exp(d - max d) / (sum + 1e-6), negatives
    exp(-d) / (sum + 1e-6) (the public code shifts the negated negative distances by 0)."""
    losses, correct = [], 0
    for i in range(len(inputs)):
        same = targets == targets[i]
        distances = torch.stack([torch.dist(inputs[i], inputs[j]) for j in range(len(inputs))])
        positive, negative = distances[same], distances[~same]
        positive_weights = torch.exp(positive - positive.max())
        negative_weights = torch.exp(-negative)
        furthest = (positive * positive_weights).sum() / (positive_weights.sum() + 1e-6)
        closest = (negative * negative_weights).sum() / (negative_weights.sum() + 1e-6)
        losses.append(math.log1p(math.exp(-(closest - furthest).item())))
        correct += int(closest >= furthest)
    return sum(losses) / len(losses), correct


def test_pairwise_distances_match_torch_cdist():
    inputs, _ = shuffled_batch()
    expected = torch.cdist(inputs, inputs)
    assert torch.allclose(pairwise_distances(inputs), expected.clamp(min=1e-6), atol=1e-6)


@pytest.mark.parametrize('seed, scale', [(0, 1.0), (1, 0.2), (2, 3.0)])
def test_batch_hard_triplet_matches_the_per_anchor_reference(seed, scale):
    inputs, targets = shuffled_batch(seed=seed, scale=scale)
    for margin in (0.3, 5.0):
        loss, correct = OriTripletLoss(margin)(inputs, targets)
        expected_loss, expected_correct = batch_hard_reference(inputs, targets, margin)
        assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
        assert correct == expected_correct


@pytest.mark.parametrize('seed, scale', [(0, 1.0), (1, 0.2), (2, 3.0), (3, 8.0)])
def test_weighted_triplet_matches_the_per_anchor_reference(seed, scale):
    inputs, targets = shuffled_batch(seed=seed, scale=scale)
    loss, correct = TripletLoss_WRT()(inputs, targets)
    expected_loss, expected_correct = weighted_reference(inputs, targets)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert correct == expected_correct


def test_batch_hard_triplet_by_hand():
    # points on a line, identities 0, 0, 1, 1; distances 0-1: 1, 0-3: 3, 1-3: 2, 3-5: 2
    inputs = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    targets = torch.tensor([0, 0, 1, 1])
    loss, correct = OriTripletLoss(margin=0.3)(inputs, targets)
    # only the anchor at 3 is inside the margin: hardest positive 2, hardest negative 2
    assert loss.item() == pytest.approx(0.3 / 4, abs=1e-6)
    assert correct == 4  # a tie counts as correct, as in the public code


def weighted_pair(positive, negatives):
    """(weighted positive, weighted negative) distances of an anchor whose only other positive is
    `positive` away (itself at distance ~0 takes weight exp(-positive)), by the public formulas."""
    furthest = positive / (1.0 + math.exp(-positive) + 1e-6)
    weights = [math.exp(-d) for d in negatives]
    closest = sum(d * w for d, w in zip(negatives, weights)) / (sum(weights) + 1e-6)
    return furthest, closest


def test_weighted_triplet_by_hand():
    inputs = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1])
    # per anchor: (distance to the other positive, distances to the negatives)
    layout = [(1.0, (3.0, 6.0)), (1.0, (2.0, 5.0)), (3.0, (3.0, 2.0)), (3.0, (6.0, 5.0))]
    pairs = [weighted_pair(*anchor) for anchor in layout]
    expected = sum(math.log1p(math.exp(furthest - closest)) for furthest, closest in pairs) / 4
    loss, correct = TripletLoss_WRT()(inputs, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the anchor at 3 fails: its negative 2 away pulls the weighted one to 2.27, under 2.86
    assert correct == 3


def test_weighted_triplet_keeps_the_public_normaliser_quirk():
    # negatives 20 away: sum exp(-d) ~ 3e-9 is swamped by the 1e-6 of the normaliser, so the
    # weighted negative distances collapse to 0.06..0.15 instead of ~20, as in the public code
    inputs = torch.tensor([[0.0], [1.0], [20.0], [21.0]])
    targets = torch.tensor([0, 0, 1, 1])
    distances = pairwise_distances(inputs)
    negative = (targets.unsqueeze(0) != targets.unsqueeze(1)).float()
    weights = agw_softmax_weights(-distances * negative, negative)
    closest = (distances * negative * weights).sum(dim=1)
    expected_first = (20 * math.exp(-20) + 21 * math.exp(-21)) / (math.exp(-20) + math.exp(-21) + 1e-6)
    assert closest[0].item() == pytest.approx(expected_first, rel=1e-4)
    assert closest.max() < 0.2
    loss, _ = TripletLoss_WRT()(inputs, targets)
    assert loss.item() == pytest.approx(weighted_reference(inputs.double(), targets)[0], rel=1e-4)
    assert loss.item() > 0.5  # a properly normalised softmax would give ~softplus(0.7 - 20) ~ 0


def test_softmax_weights_sum_to_just_under_one_and_vanish_outside_the_mask():
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(5, 7, generator=generator) * 3
    mask = (torch.rand(5, 7, generator=generator) > 0.4).float()
    mask[:, 0] = 1.0
    weights = agw_softmax_weights(values * mask, mask)
    assert (weights[mask == 0] == 0).all()
    sums = weights.sum(dim=1)
    assert (sums < 1).all() and torch.allclose(sums, torch.ones(5), atol=1e-5)
    # inside the mask, the softmax of the masked values, whatever the shift
    expected = torch.where(mask.bool(), values, torch.tensor(float('-inf'))).softmax(dim=1)
    assert torch.allclose(weights, expected, atol=1e-5)


@pytest.mark.parametrize('criterion', [OriTripletLoss(), TripletLoss_WRT()])
def test_gradients_flow_and_stay_finite_with_duplicates(criterion):
    inputs, targets = shuffled_batch(num_ids=4, per_id=3, dim=8, seed=4)
    inputs = inputs.float()
    inputs[1] = inputs[0]  # two samples at distance 0 exercise the clamped root
    inputs.requires_grad_(True)
    loss, _ = criterion(inputs, targets)
    loss.backward()
    assert torch.isfinite(inputs.grad).all()
    assert inputs.grad.abs().sum() > 0
