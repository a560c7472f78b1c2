"""k-reciprocal re-ranking (Zhong, Zheng, Cao and Li, "Re-ranking person re-identification with
k-reciprocal encoding", CVPR 2017), vectorised with torch so that it runs on the device the test
script uses, the GPU when there is one.

The paper, for every image p among the N = Q + G query and gallery images together:

    N(p, k)    the k nearest neighbours of p
    R(p, k)    = {g in N(p, k) : p in N(g, k)}, its k-reciprocal neighbours
    R*(p, k)   = R(p, k) joined by R(q, k/2) for each q in R(p, k) whose R(q, k/2) lies at least
                 2/3 inside R(p, k)
    V[p, g]    = exp(-d(p, g)) for g in R*(p, k1), else 0
    V[p]      <- the mean of V[q] over q in N(p, k2)                  (local query expansion)
    d_J(p, g)  = 1 - sum_j min(V[p, j], V[g, j]) / sum_j max(V[p, j], V[g, j])    (Jaccard distance)
    d*(p, g)   = (1 - lambda) d_J(p, g) + lambda d(p, g)

Where the paper leaves a choice open, this follows the authors' released code, from which the
published re-ranked figures (and those of the VI-ReID repositories that report them) come:

- d(p, g) is the squared Euclidean distance divided by the largest one in p's row, so that the
  Gaussian kernel exp(-d) sees values in [0, 1] whatever the scale of the features;
- N(p, k) holds the k + 1 nearest images, p itself first;
- k/2 is round(k1 / 2), and a set R(q, k/2) joins R* when strictly more than 2/3 of it is in R(p, k1);
- each row of V is divided by its sum over R*(p, k1), so that every row sums to 1.

Importing this module has no side effects.
"""
import torch

__all__ = ['k_reciprocal_distance']

# Upper bound on the (query entry, gallery entry) pairs the Jaccard step forms at once: 4 M pairs
# take about 0.2 GB of index and value arrays at the peak, whatever the set size.
_JACCARD_PAIRS_PER_BLOCK = 1 << 22


def k_reciprocal_distance(query_features, gallery_features, k1=20, k2=6, lambda_value=0.3, device=None):
    """Re-ranked distance d* of every query to every gallery image.

    query_features: (Q, D) and gallery_features: (G, D) arrays or tensors (the test scripts pass
    L2-normalised features; query-query, query-gallery and gallery-gallery distances are all used).
    device: where to compute (default: where the tensors are, the CPU for arrays). The computation
    runs in float32, or float64 when both inputs are float64.
    Returns a (Q, G) numpy array, smaller is closer, as eval_metrics expects.

    Memory: the (Q + G) x (Q + G) distances, R* as booleans, arrays in proportion to the non-zero
    entries of V and a few (Q, G) results: at the peak about 0.8 GB for SYSU-MM01 multi-shot
    (3,803 x 3,840), measured on the CPU.
    """
    query = torch.as_tensor(query_features, device=device)
    gallery = torch.as_tensor(gallery_features, device=query.device)
    dtype = torch.float64 if query.dtype == gallery.dtype == torch.float64 else torch.float32
    features = torch.cat([query, gallery]).to(dtype)
    num_query, num_images = len(query), len(features)

    distance = _row_scaled_squared_distances(features)                          # d, (N, N)
    # Nearest first, each image itself at rank 0: enough columns for N(p, k1) and N(p, k2).
    num_nearest = min(max(k1 + 1, k2), num_images)
    nearest = torch.topk(distance, num_nearest, dim=1, largest=False, sorted=True).indices

    # V is sparse (R*(p, k1) has about k1 members), so it is kept as its non-zero entries
    # (rows, columns, values), rows ascending.
    rows, columns = _expanded_reciprocal_sets(nearest, k1).nonzero(as_tuple=True)
    values = torch.exp(-distance[rows, columns])                                # Gaussian kernel
    values /= _row_sums(rows, values, num_images)[rows]                         # each row sums to 1
    if k2 > 1:  # N(p, 1) is p alone: nothing to average
        rows, columns, values = _local_query_expansion(rows, columns, values, nearest[:, :k2])
    jaccard = _jaccard_distance(rows, columns, values, num_query, num_images)   # d_J, (Q, G)

    final = (1 - lambda_value) * jaccard + lambda_value * distance[:num_query, num_query:]
    return final.cpu().numpy()


def _row_scaled_squared_distances(features):
    """(N, D) -> (N, N): squared Euclidean distances, each row divided by its largest entry."""
    squared_norms = (features * features).sum(dim=1)
    distance = features @ features.T                                            # built in place: one N x N
    distance.mul_(-2).add_(squared_norms[:, None]).add_(squared_norms[None, :])
    distance.clamp_(min=0)  # rounding leaves tiny negative values where two features are (nearly) equal
    return distance.div_(distance.amax(dim=1, keepdim=True).clamp(min=torch.finfo(distance.dtype).tiny))


def _reciprocal(neighbours):
    """neighbours: (N, k) image indices, each row nearest first (N(p, k) of image p = row p).
    Returns (N, k) bool: whether neighbours[p, j] also has p in its own row, i.e. is in R(p, k)."""
    own_index = torch.arange(len(neighbours), device=neighbours.device)[:, None, None]
    return (neighbours[neighbours] == own_index).any(dim=2)                     # via (N, k, k)


def _expanded_reciprocal_sets(nearest, k1):
    """nearest: (N, K) indices, nearest first, K >= k1 + 1 where N allows.
    Returns (N, N) bool, row p the membership of R*(p, k1)."""
    num_images = len(nearest)
    neighbours = nearest[:, :k1 + 1]                                            # N(p, k1)
    in_reciprocal = _reciprocal(neighbours)                                     # R(p, k1) within it
    members = torch.zeros(num_images, num_images, dtype=torch.bool, device=nearest.device)
    members.scatter_(1, neighbours, in_reciprocal)

    half_neighbours = nearest[:, :round(k1 / 2) + 1]                            # N(q, k1/2)
    half_reciprocal = _reciprocal(half_neighbours)                              # R(q, k1/2) within it
    # For each p and each of its neighbours q = neighbours[p, j]: the set R(q, k1/2), (N, k1 + 1, h).
    candidate_sets = half_neighbours[neighbours]
    candidate_masks = half_reciprocal[neighbours]
    inside = members.gather(1, candidate_sets.flatten(1)).view_as(candidate_sets) & candidate_masks
    # |R(q, k1/2) & R(p, k1)| > 2/3 |R(q, k1/2)|, in integers so that no rounding decides it
    joins = in_reciprocal & (3 * inside.sum(dim=2) > 2 * candidate_masks.sum(dim=2))
    added = joins[:, :, None] & candidate_masks
    rows = torch.arange(num_images, device=nearest.device)[:, None, None].expand_as(candidate_sets)
    members[rows[added], candidate_sets[added]] = True
    return members


def _row_sums(rows, values, num_rows):
    """(num_rows,) sums of the entries (rows, values) of a sparse matrix."""
    return values.new_zeros(num_rows).index_add_(0, rows, values)


def _segments(starts, lengths):
    """The concatenated index ranges [starts[i], starts[i] + lengths[i]) of 1-d integer tensors.
    Returns (owner, index), both (sum of lengths,): for each index, the i whose range it is in."""
    owner = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    range_start = torch.cumsum(lengths, 0) - lengths                           # of each range in the output
    offset = torch.arange(len(owner), device=starts.device) - range_start[owner]
    return owner, starts[owner] + offset


def _local_query_expansion(rows, columns, values, neighbours):
    """V as entries (rows, columns, values), rows ascending; neighbours: (N, k2), N(p, k2) with p first.
    Returns V' in the same form (rows ascending), V'[p] = the mean of V[q] over q in N(p, k2)."""
    num_images, k2 = neighbours.shape
    per_row = torch.bincount(rows, minlength=num_images)
    row_start = torch.cumsum(per_row, 0) - per_row
    # Every entry of every neighbour's row, credited to p with weight 1/k2 ...
    neighbour = neighbours.flatten()
    owner, entry = _segments(row_start[neighbour], per_row[neighbour])
    credited_rows = torch.div(owner, k2, rounding_mode='floor')                 # p of each (p, q) pair
    keys = credited_rows * num_images + columns[entry]
    # ... then the entries that fall on the same (p, j) summed.
    keys, slot = torch.unique(keys, sorted=True, return_inverse=True)
    summed = values.new_zeros(len(keys)).index_add_(0, slot, values[entry] / k2)
    return torch.div(keys, num_images, rounding_mode='floor'), keys % num_images, summed


def _jaccard_distance(rows, columns, values, num_query, num_images):
    """1 - sum_j min(V[p, j], V[g, j]) / sum_j max(V[p, j], V[g, j]) for every query p (rows below
    num_query) and gallery image g (the others). V: entries (rows, columns, values), rows ascending,
    values positive. Returns (Q, G), G = num_images - num_query.

    min(V[p, j], V[g, j]) is 0 unless both entries exist, so only the pairs of a query entry and a
    gallery entry in the same column are formed (the inverted index of the authors' code, here as
    arrays): gallery entries are sorted by column, and each query entry meets the run of its column.
    The sum of the maxima is the sum of both rows minus that of the minima.
    """
    num_gallery = num_images - num_query
    is_query = rows < num_query
    query_rows, query_columns, query_values = rows[is_query], columns[is_query], values[is_query]
    by_column = torch.argsort(columns[~is_query], stable=True)
    gallery_rows = rows[~is_query][by_column] - num_query
    gallery_columns, gallery_values = columns[~is_query][by_column], values[~is_query][by_column]
    per_column = torch.bincount(gallery_columns, minlength=num_images)
    column_start = torch.cumsum(per_column, 0) - per_column

    # Query entries in blocks of whole rows, about _JACCARD_PAIRS_PER_BLOCK pairs each.
    pairs_of_entry = per_column[query_columns]
    rows_per_block = max(1, int(_JACCARD_PAIRS_PER_BLOCK * num_query / max(1, int(pairs_of_entry.sum()))))
    entry_start = torch.searchsorted(query_rows, torch.arange(0, num_query + rows_per_block, rows_per_block,
                                                              device=rows.device).clamp(max=num_query))
    intersection = values.new_zeros(num_query * num_gallery)                   # sums of the minima, flat
    for first, last in zip(entry_start[:-1].tolist(), entry_start[1:].tolist()):
        block_columns = query_columns[first:last]
        owner, partner = _segments(column_start[block_columns], per_column[block_columns])
        minima = torch.minimum(query_values[first:last][owner], gallery_values[partner])
        intersection.index_add_(0, query_rows[first:last][owner] * num_gallery + gallery_rows[partner], minima)
    intersection = intersection.view(num_query, num_gallery)

    union = (_row_sums(query_rows, query_values, num_query)[:, None]
             + _row_sums(gallery_rows, gallery_values, num_gallery)[None, :] - intersection)
    return 1 - intersection / union
