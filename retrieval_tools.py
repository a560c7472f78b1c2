"""Test-time tools of the three test scripts (test.py, AGW/test.py, DDAG/test_ddag.py), written once:

    add_test_time_flags(parser)         --rerank (--k1, --k2, --lambda_value), --flip, --visualize N
                                        (--visualize_dir), --save_features FILE
    check_test_time_flags(args)         bad values and unwritable places, before any image is read
    RankingDistance, ranking_distance(args, device)   the distance the test ranks by: -q.g, or re-ranked
    mirror_averaged(features_of)        each feature averaged with that of the mirror image (--flip)
    describe(args)                      what the flags changed, for the score lines
    output_name(checkpoint, args)       the name a run's outputs go under
    write_outputs(args, retrieval_set, distance, name, split)   --save_features and --visualize
    save_features(path, retrieval_set), write_ranked_lists(...), draw_ranked_list(...)

Everything is written atomically.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import utils
from eval_metrics import inner_product_distance
from rerank import k_reciprocal_distance

# Ranked lists: each person at TILE_SIZE (width, height) inside a FRAME-pixel coloured frame, a
# SPACING between two framed images (three between the query and its list), two lines of text under
# each, one title line above.
LIST_LENGTH = 10
TILE_SIZE = (96, 192)
FRAME = 5
SPACING = 8
QUERY_SPACING = 3 * SPACING
TITLE_HEIGHT = 24
TEXT_HEIGHT = 36
FONT_SIZE = 14
QUERY_COLOUR, MATCH_COLOUR, OTHER_COLOUR = (30, 90, 220), (0, 170, 0), (215, 0, 0)
FRAMED_WIDTH, FRAMED_HEIGHT = TILE_SIZE[0] + 2 * FRAME, TILE_SIZE[1] + 2 * FRAME


# ----------------------------------------------------------------------------- flags

def add_test_time_flags(parser):
    """The test-time flags, in their own group of `parser`."""
    group = parser.add_argument_group('test-time tools')
    group.add_argument('--rerank', action='store_true',
                       help='k-reciprocal re-ranking (Zhong et al., CVPR 2017) of every trial\'s distances')
    group.add_argument('--k1', default=20, type=int, help='re-ranking: size of the k-reciprocal neighbourhoods')
    group.add_argument('--k2', default=6, type=int, help='re-ranking: neighbours averaged in the query expansion')
    group.add_argument('--lambda_value', default=0.3, type=float,
                       help='re-ranking: weight of the original distance next to the Jaccard distance')
    group.add_argument('--flip', action='store_true',
                       help='each feature: the mean of the image\'s and its horizontal mirror\'s, L2-normalised')
    group.add_argument('--visualize', default=0, type=int, metavar='N',
                       help='draw the ranked lists (top 10) of N queries as PNG files (first gallery trial)')
    group.add_argument('--visualize_dir', default='ranked_lists',
                       help='folder for --visualize; each run writes into a subfolder named after it')
    group.add_argument('--save_features', default='', metavar='FILE',
                       help='write query and gallery features, identities, cameras and paths into one .npz '
                            '(RegDB with --trial 0: "{trial}" in FILE stands for the split)')


def check_test_time_flags(args):
    """A UserError for a bad value or a place that cannot be written, before any work starts."""
    if args.visualize < 0:
        raise utils.UserError(f'--visualize {args.visualize}: give the number of queries to draw (0 or more).')
    if args.k1 < 1 or args.k2 < 1:
        raise utils.UserError(f'--k1 {args.k1} and --k2 {args.k2} must both be at least 1.')
    if not 0 <= args.lambda_value <= 1:
        raise utils.UserError(f'--lambda_value {args.lambda_value} must lie between 0 and 1.')
    if args.save_features:
        several_splits = args.dataset == 'regdb' and args.trial == 0
        if several_splits and '{trial}' not in args.save_features:
            raise utils.UserError(f'--save_features {args.save_features}: --trial 0 tests ten RegDB splits, each '
                                  f'with its own features; write "{{trial}}" in the file name where the split '
                                  f'number goes.')
        _check_writable('--save_features', Path(args.save_features.replace('{trial}', '1')), folder=False)
    if args.visualize:
        _check_writable('--visualize_dir', Path(args.visualize_dir), folder=True)


def _check_writable(flag, path, folder):
    """A UserError unless `path` (a file, or a folder with folder=True) can be created or written."""
    if not folder and path.is_dir():
        raise utils.UserError(f'{flag} {path} is a folder: name a file in it, e.g. {path / "features.npz"}.')
    existing = path if folder else path.parent
    while not existing.exists():  # the folders that do not exist yet are made when writing
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise utils.UserError(f'{flag} {path}: cannot write there ({existing} is not a writable folder).')


def describe(args):
    """', flip-averaged, k-reciprocal re-ranking (...)' for the flags in use, '' for none."""
    parts = []
    if args.flip:
        parts.append('flip-averaged features')
    if args.rerank:
        parts.append(f'k-reciprocal re-ranking (k1 {args.k1}, k2 {args.k2}, lambda {args.lambda_value})')
    return ''.join(', ' + part for part in parts)


def output_name(checkpoint, args):
    """The name of a run's outputs: the checkpoint's, then the test settings that change the ranking,
    e.g. synthetic_agw_p4_n8_lr_0.1_seed_0_best_all_single_flip_rerank."""
    name = Path(checkpoint).stem
    if args.dataset == 'regdb':
        name += '_tvsearch' if args.tvsearch else ''
    else:
        name += f'_{args.mode}_{getattr(args, "shot", "single")}'
    return name + ('_flip' if args.flip else '') + ('_rerank' if args.rerank else '')


# ----------------------------------------------------------------------------- features and distances

def mirror_averaged(features_of):
    """features_of(images) -> (B, D) tensor or tuple of (B, D) tensors, images (B, 3, H, W).
    Returns the function giving, for each feature, the L2-normalised mean of its values on the images
    and on their horizontal mirrors (CAJ's test-time flip, renormalised so that features stay unit
    length and inner products stay cosines). It costs a second forward pass."""
    def averaged(images):
        plain, mirrored = features_of(images), features_of(images.flip(3))
        if torch.is_tensor(plain):
            return F.normalize((plain + mirrored) / 2, dim=1)
        return tuple(F.normalize((one + other) / 2, dim=1) for one, other in zip(plain, mirrored))
    return averaged


@dataclass(frozen=True)
class RankingDistance:
    """The distance a test ranks by: features (Q, D), (G, D) -> (Q, G) numpy array, smaller is closer.

    Without re-ranking the protocol's -q.g (eval_metrics.inner_product_distance), which pictures show
    as the cosine distance 1 - q.g; with it rerank.k_reciprocal_distance, computed on `device`.
    """
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    device: torch.device = None

    def __call__(self, query_features, gallery_features):
        if not self.rerank:
            return inner_product_distance(query_features, gallery_features)
        return k_reciprocal_distance(query_features, gallery_features, self.k1, self.k2, self.lambda_value,
                                     self.device)

    @property
    def label(self):
        if self.rerank:
            return f'k-reciprocal distance (k1 {self.k1}, k2 {self.k2}, lambda {self.lambda_value})'
        return 'cosine distance'

    def shown(self, distances):
        """The values a picture prints for `distances` of this kind."""
        return distances if self.rerank else 1 + distances


def ranking_distance(args, device):
    return RankingDistance(args.rerank, args.k1, args.k2, args.lambda_value, device)


# ----------------------------------------------------------------------------- outputs

def write_outputs(args, retrieval_set, distance, name, split=None):
    """--save_features and --visualize for one tested checkpoint; its outputs go under `name`
    (output_name). split: the RegDB split, which "{trial}" in --save_features stands for (None:
    SYSU-MM01, the name is taken as it is)."""
    if args.save_features:
        path = Path(args.save_features if split is None else args.save_features.replace('{trial}', str(split)))
        save_features(path, retrieval_set)
        print(f'features saved to {path}')
    if args.visualize:
        folder = Path(args.visualize_dir) / name
        written = write_ranked_lists(folder, retrieval_set, distance, args.visualize)
        queries = len(written) // len(retrieval_set.feature_names)
        print(f'ranked lists of {queries} queries ({", ".join(retrieval_set.feature_names)} features, first '
              f'gallery trial) drawn into {folder}')


def save_features(path, retrieval_set):
    """One .npz file (loads with numpy alone, no pickle): for each feature name F
    query_features_F (Q, D) and gallery_features_F (G, D); query_ids, query_cams (Q,) int64 and
    query_paths (Q,) str; the same for the gallery; feature_names; gallery_trials (T, G_t) int64,
    the gallery rows each trial uses (SYSU-MM01: the 10 draws; RegDB: one, every row)."""
    arrays = {'feature_names': np.array(retrieval_set.feature_names)}
    for side in ('query', 'gallery'):
        for name, features in getattr(retrieval_set, f'{side}_features').items():
            arrays[f'{side}_features_{name}'] = features
        arrays[f'{side}_ids'] = getattr(retrieval_set, f'{side}_ids')
        arrays[f'{side}_cams'] = getattr(retrieval_set, f'{side}_cams')
        arrays[f'{side}_paths'] = np.array([str(path) for path in getattr(retrieval_set, f'{side}_paths')])
    arrays['gallery_trials'] = np.stack(retrieval_set.trial_rows)
    utils.save_arrays(arrays, path)


def drawn_queries(num_queries, count):
    """`count` query indices spread evenly over [0, num_queries) (the query list is sorted by
    identity, so they show different people), all of them when there are fewer."""
    count = min(count, num_queries)
    return np.linspace(0, num_queries - 1, count).round().astype(int) if count else np.zeros(0, dtype=int)


def write_ranked_lists(folder, retrieval_set, distance, count, trial_index=0):
    """Draw the ranked lists of `count` queries (drawn_queries) against the gallery of trial
    `trial_index`, for every feature: <folder>/<feature>_query_<index>.png. Returns the paths."""
    queries = drawn_queries(len(retrieval_set.query_paths), count)
    rows = retrieval_set.trial_rows[trial_index]
    written = []
    for name in retrieval_set.feature_names:
        distmat = retrieval_set.distances(name, trial_index, distance)
        ranked = retrieval_set.ranked_lists(distmat, queries, trial_index, LIST_LENGTH)
        for query, positions in zip(queries, ranked):
            gallery = [(retrieval_set.gallery_paths[rows[position]], retrieval_set.gallery_ids[rows[position]],
                        retrieval_set.gallery_cams[rows[position]], distance.shown(distmat[query, position]))
                       for position in positions]
            title = f'query {query}, {name} feature, {distance.label}, gallery trial {trial_index}'
            picture = draw_ranked_list(title, retrieval_set.query_paths[query], retrieval_set.query_ids[query],
                                       retrieval_set.query_cams[query], gallery)
            path = Path(folder) / f'{name}_query_{query:05d}.png'
            utils.atomic_write(path, lambda temporary: picture.save(temporary, format='PNG'))
            written.append(path)
    return written


def ranked_list_size(length=LIST_LENGTH):
    """(width, height) in pixels of a picture of a query and `length` gallery images."""
    width = SPACING + FRAMED_WIDTH + QUERY_SPACING + length * FRAMED_WIDTH + (length - 1) * SPACING + SPACING
    return width, TITLE_HEIGHT + FRAMED_HEIGHT + TEXT_HEIGHT


def draw_ranked_list(title, query_path, query_id, query_cam, gallery):
    """A picture (PIL RGB image of ranked_list_size()): the query, then its ranked gallery images,
    each framed (query blue, same identity green, another identity red) and labelled with its rank,
    distance, identity and camera. gallery: up to LIST_LENGTH (path, id, camera, distance shown)."""
    picture = Image.new('RGB', ranked_list_size(), 'white')
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=FONT_SIZE)
    draw.text((SPACING, (TITLE_HEIGHT - FONT_SIZE) // 2), title, fill='black', font=font)
    _draw_tile(picture, draw, font, SPACING, query_path, QUERY_COLOUR, ('query', f'id {query_id} cam {query_cam}'))
    left = SPACING + FRAMED_WIDTH + QUERY_SPACING
    for rank, (path, gallery_id, gallery_cam, shown) in enumerate(gallery, start=1):
        colour = MATCH_COLOUR if gallery_id == query_id else OTHER_COLOUR
        _draw_tile(picture, draw, font, left, path, colour,
                   (f'{rank}: {shown:.3f}', f'id {gallery_id} cam {gallery_cam}'))
        left += FRAMED_WIDTH + SPACING
    return picture


def _draw_tile(picture, draw, font, left, path, colour, lines):
    """One framed image with its left edge at `left`, below the title, and two lines of text under it."""
    draw.rectangle((left, TITLE_HEIGHT, left + FRAMED_WIDTH - 1, TITLE_HEIGHT + FRAMED_HEIGHT - 1), fill=colour)
    with Image.open(path) as image:
        picture.paste(image.convert('RGB').resize(TILE_SIZE, Image.Resampling.BICUBIC),
                      (left + FRAME, TITLE_HEIGHT + FRAME))
    for index, line in enumerate(lines):
        draw.text((left + 2, TITLE_HEIGHT + FRAMED_HEIGHT + 2 + index * (FONT_SIZE + 3)), line, fill='black',
                  font=font)
