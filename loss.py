"""Losses: MMGL's pretext tasks (stripe permutation recovery, part-aware cycle-contrastive learning)
and the identity losses of AGW and DDAG fine-tuning."""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# ----------------------------------------------------------------------------- permutation recovery


def random_permutations(batch_size, num_stripe, generator=None, device=None):
    """(B, S) int64: each row a permutation drawn uniformly from all S! orders."""
    noise = torch.rand(batch_size, num_stripe, generator=generator)
    return noise.argsort(dim=1).to(device)


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


def permutation_loss(predicted, permutations):
    """MSE between predicted doubly-stochastic matrices (B, S, S) and the true permutations (B, S)."""
    return F.mse_loss(predicted, permutation_matrices(permutations))


def decode_permutations(predicted):
    """Hungarian decoding of (B, S, S) scores into the most likely permutations, (B, S) int64."""
    scores = predicted.detach().float().cpu().numpy()
    decoded = [linear_sum_assignment(matrix, maximize=True)[1] for matrix in scores]
    return torch.from_numpy(np.stack(decoded)).long()


def permutation_accuracy(predicted, permutations):
    """(exact-match rate, per-stripe rate) of the decoded permutations against the true ones (B, S)."""
    correct = decode_permutations(predicted) == permutations.cpu()
    return correct.all(dim=1).float().mean().item(), correct.float().mean().item()


# ----------------------------------------------------------------------------- cycle-contrastive learning


def cycle_contrastive_loss(visible, thermal, temperature=0.07):
    """Cycle-consistency between modalities, from both sides, averaged.

    visible: (N_v, D), thermal: (N_t, D), both L2-normalised. Each embedding walks to its soft
    nearest neighbour in the other modality and must walk back to itself: cross-entropy of the
    similarities of that neighbour to every embedding of its own modality, target = itself.
    """
    def walk_and_return(source, target):
        attention = torch.softmax(source @ target.t() / temperature, dim=1)
        neighbours = F.normalize(attention @ target, dim=1)
        logits = neighbours @ source.t() / temperature
        return F.cross_entropy(logits, torch.arange(len(source), device=source.device))

    return 0.5 * (walk_and_return(visible, thermal) + walk_and_return(thermal, visible))
