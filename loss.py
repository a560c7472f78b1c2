"""Losses: MMGL's pretext tasks (stripe permutation recovery, part-aware cycle-contrastive learning)
and the identity losses of AGW and DDAG fine-tuning."""
import functools
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# ----------------------------------------------------------------------------- permutation recovery


def random_permutations(batch_size, num_stripe, generator=None, device=None):
    """(B, S) int64 on `device`: each row a permutation drawn uniformly from all S! orders, from
    generator (on that device) or the device's default generator."""
    noise = torch.rand(batch_size, num_stripe, generator=generator, device=device)
    return noise.argsort(dim=1)


def shuffle_stripes(images, permutations):
    """Cut each image into S equal horizontal stripes and reorder them: stripe k of the output is
    stripe permutations[b, k] of the input. images: (B, C, H, W) with H divisible by S;
    permutations: (B, S). Returns (B, C, H, W)."""
    batch, channels, height, width = images.shape
    num_stripe = permutations.shape[1]
    if height % num_stripe:
        raise ValueError(f'image height {height} is not divisible by the number of stripes {num_stripe}')
    stripes = images.view(batch, channels, num_stripe, height // num_stripe, width)
    index = permutations.view(batch, 1, num_stripe, 1, 1).expand_as(stripes)
    return stripes.gather(2, index).view_as(images)


def permutation_matrices(permutations):
    """(B, S) -> (B, S, S) float with P[b, k, permutations[b, k]] = 1."""
    return F.one_hot(permutations, permutations.shape[1]).float()


PERM_LOSSES = ('mse', 'mse_sum', 'ce')


def permutation_loss(predicted, permutations, kind='mse'):
    """Error of predicted doubly-stochastic matrices (B, S, S) against the true permutations (B, S).

    'mse': squared error averaged over the B x S x S entries (the paper's MSE);
    'mse_sum': squared error summed over each image's S x S entries, averaged over images
    (the same loss S * S times larger);
    'ce': cross-entropy of each row against its true column, -log P[b, k, permutations[b, k]],
    averaged over the B x S rows.
    """
    if kind == 'mse':
        return F.mse_loss(predicted, permutation_matrices(permutations))
    if kind == 'mse_sum':
        return F.mse_loss(predicted, permutation_matrices(permutations), reduction='sum') / len(predicted)
    if kind == 'ce':
        true_entries = predicted.gather(2, permutations.unsqueeze(2))
        return -true_entries.clamp_min(1e-12).log().mean()
    raise ValueError(f'kind must be one of {PERM_LOSSES}, got {kind!r}')


# Up to this many stripes, decoding compares every permutation on the device; beyond, the Hungarian
# algorithm runs on the CPU (7! = 5,040 candidates; 8! would be 40,320).
MAX_ENUMERATED_STRIPES = 7


@functools.lru_cache(maxsize=None)
def _all_permutations(num_stripe, device):
    """(S!, S) int64 on `device`, copied there once: a copy from host memory makes the host wait for the GPU."""
    return torch.tensor(list(itertools.permutations(range(num_stripe))), dtype=torch.long).to(device)


def decode_permutations(predicted):
    """The most likely permutations of doubly-stochastic (B, S, S) matrices, (B, S) int64 on their
    device: the permutation whose entries have the largest summed log. Sinkhorn changes the log scores
    by a row and a column term only, whose sum is the same for every permutation, so this is the
    permutation of highest raw score whatever the Sinkhorn temperature. Up to
    MAX_ENUMERATED_STRIPES stripes every permutation is scored on the device (no wait for the GPU);
    beyond, the Hungarian algorithm solves the same problem on the CPU."""
    scores = predicted.detach().float().clamp_min(1e-30).log()
    num_stripe = scores.shape[1]
    if num_stripe <= MAX_ENUMERATED_STRIPES:
        candidates = _all_permutations(num_stripe, scores.device)                          # (S!, S)
        totals = scores[:, torch.arange(num_stripe, device=scores.device), candidates].sum(dim=2)  # (B, S!)
        return candidates[totals.argmax(dim=1)]
    decoded = [linear_sum_assignment(matrix, maximize=True)[1] for matrix in scores.cpu().numpy()]
    return torch.from_numpy(np.stack(decoded)).long().to(scores.device)


def permutation_accuracy(predicted, permutations):
    """(exact-match rate, per-stripe rate) of the decoded permutations against the true ones (B, S),
    as 0-dim float tensors on the device."""
    correct = decode_permutations(predicted) == permutations.to(predicted.device)
    return correct.all(dim=1).float().mean(), correct.float().mean()


# ----------------------------------------------------------------------------- cycle-contrastive learning


PCC_FORMS = ('cycle', 'figure')


def soft_neighbours(queries, keys, temperature, exclude=None):
    """Each query's soft nearest neighbour among the keys, sum_j softmax_j(q . k_j / tau) k_j,
    L2-normalised. queries (N, D), keys (M, D); exclude: optional (N, M) bool, keys a query may not
    pick. Returns (N, D)."""
    logits = queries @ keys.t() / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float('-inf'))
    return F.normalize(torch.softmax(logits, dim=1) @ keys, dim=1)


def cycle_contrastive_loss(visible, thermal, temperature=0.07):
    """Cycle-consistency between modalities, from both sides, averaged.

    visible: (N_v, D), thermal: (N_t, D), both L2-normalised. Each embedding walks to its soft
    nearest neighbour in the other modality and must walk back to itself: cross-entropy of the
    similarities of that neighbour to every embedding of its own modality, target = itself.
    """
    def walk_and_return(source, target):
        neighbours = soft_neighbours(source, target, temperature)
        logits = neighbours @ source.t() / temperature
        return F.cross_entropy(logits, torch.arange(len(source), device=source.device))

    return 0.5 * (walk_and_return(visible, thermal) + walk_and_return(thermal, visible))


def figure_contrastive_loss(visible, thermal, num_parts, temperature=0.07):
    """PCC as the paper's pipeline figure draws it: a query part q takes its soft nearest neighbour
    among the parts of the other modality (q_other) and among the parts of the other images of its
    own modality (q_same); (q_other, q_same) is a positive pair of an InfoNCE over all queries, in
    both directions. Both modalities serve as queries; the four InfoNCE terms are averaged.

    visible: (B_v * P, D), thermal: (B_t * P, D), L2-normalised, the P parts of each image
    consecutive (image-major), so that a part's own image is known.
    """
    def infonce_of_query_side(queries, other_modality):
        image = torch.arange(len(queries), device=queries.device) // num_parts
        same_image = image.unsqueeze(0) == image.unsqueeze(1)
        across = soft_neighbours(queries, other_modality, temperature)
        within = soft_neighbours(queries, queries, temperature, exclude=same_image)
        logits = across @ within.t() / temperature
        targets = torch.arange(len(queries), device=queries.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))

    return 0.5 * (infonce_of_query_side(visible, thermal) + infonce_of_query_side(thermal, visible))


# ----------------------------------------------------------------------------- identity losses of AGW and DDAG fine-tuning


def pairwise_distances(features):
    """Euclidean distances between the rows of (N, D) features: (N, N). Squares are clamped at
    1e-12 before the root, so the root's gradient stays finite on the diagonal."""
    squared_norms = features.pow(2).sum(dim=1, keepdim=True)
    squared = squared_norms + squared_norms.t() - 2 * features @ features.t()
    return squared.clamp(min=1e-12).sqrt()


def same_identity(targets):
    """(N,) labels -> (N, N) bool, True where two samples share an identity (the diagonal included)."""
    return targets.unsqueeze(0) == targets.unsqueeze(1)


class OriTripletLoss(torch.nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017): per anchor, the furthest sample of its own
    identity and the closest of another, hinged at `margin`.

    forward(inputs (N, D), targets (N,)) -> (loss, correct): loss = mean relu(d_ap - d_an + margin);
    correct = number of anchors whose hardest negative is no closer than their hardest positive
    (a 0-dim tensor, so that the training step never waits for the GPU to read it).
    """

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin

    def forward(self, inputs, targets):
        distances = pairwise_distances(inputs)
        positive = same_identity(targets)
        hardest_positive = distances.masked_fill(~positive, float('-inf')).max(dim=1).values
        hardest_negative = distances.masked_fill(positive, float('inf')).min(dim=1).values
        loss = F.relu(hardest_positive - hardest_negative + self.margin).mean()
        correct = (hardest_negative >= hardest_positive).sum()
        return loss, correct


def agw_softmax_weights(values, mask):
    """Softmax over the entries of each row inside `mask`, as the public AGW code computes it.

    values, mask: (N, N), values zero outside the mask; returns (N, N) weights, zero outside it.
    The exponents are shifted by the row maximum of the values, zeros outside the mask included:
    for distances to positives that is their largest, for negated distances to negatives it is 0.
    Either way no exponent is positive, so nothing overflows. The 1e-6 added to the normaliser
    makes the weights sum to just under 1, and to much less when every negative is far (the sum
    of exp(-d) is then comparable to 1e-6): a quirk kept so that losses match the public code.
    """
    shift = values.max(dim=1, keepdim=True).values
    exponentials = torch.exp(values - shift) * mask
    return exponentials / (exponentials.sum(dim=1, keepdim=True) + 1e-6)


class TripletLoss_WRT(torch.nn.Module):
    """Weighted regularised triplet loss of AGW, without a margin to tune.

    Per anchor, the positive distance is a softmax(d)-weighted mean over its identity (leaning to
    the furthest) and the negative distance a softmax(-d)-weighted mean over the other identities
    (leaning to the closest); loss = mean softplus(positive - negative), the soft-margin loss.
    forward(inputs (N, D), targets (N,)) -> (loss, correct), correct = anchors with negative >= positive
    (a 0-dim tensor).
    """

    def forward(self, inputs, targets):
        distances = pairwise_distances(inputs)
        positive = same_identity(targets).float()
        negative = 1.0 - positive
        positive_distances = distances * positive
        negative_distances = distances * negative
        furthest_positive = (positive_distances * agw_softmax_weights(positive_distances, positive)).sum(dim=1)
        closest_negative = (negative_distances * agw_softmax_weights(-negative_distances, negative)).sum(dim=1)
        loss = F.softplus(furthest_positive - closest_negative).mean()
        correct = (closest_negative >= furthest_positive).sum()
        return loss, correct
