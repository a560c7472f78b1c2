"""Shared fixtures: small synthetic datasets generated once per test session.

The trees are shared by every test that asks for them: treat them as read-only (copy one into
tmp_path before changing it).
"""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import synthetic  # noqa: E402
from data_loader import prepare_dataset  # noqa: E402
from data_manager import read_split_ids  # noqa: E402
from pre_process_sysu import preprocess_sysu  # noqa: E402

# Small enough to generate in about a second; twelve gallery images per folder so that multi-shot
# (ten) really draws.
SMALL_SYSU = dict(seed=0, num_train_ids=5, num_val_ids=2, num_test_ids=4, images_per_camera=3,
                  gallery_images_per_camera=12, size=(48, 96))
SMALL_REGDB = dict(seed=0, num_ids=6, images_per_modality=3, size=(32, 64))


@pytest.fixture(scope='session')
def sysu_tree(tmp_path_factory):
    """Path of a small synthetic SYSU-MM01 tree, not pre-processed (no .npy files)."""
    return synthetic.make_synthetic_sysu(tmp_path_factory.mktemp('sysu') / 'SYSU-MM01', **SMALL_SYSU)


@pytest.fixture(scope='session')
def sysu_preprocessed(tmp_path_factory):
    """Path of a small synthetic SYSU-MM01 tree (same content as sysu_tree) with the six
    train_*_resized_*.npy arrays of pre_process_sysu.py (images 288 x 144)."""
    root = synthetic.make_synthetic_sysu(tmp_path_factory.mktemp('sysu_preprocessed') / 'SYSU-MM01', **SMALL_SYSU)
    preprocess_sysu(root, progress=False)
    return root


@pytest.fixture(scope='session')
def regdb_tree(tmp_path_factory):
    """Path of a small synthetic RegDB tree: 6 identities, 3 images per modality, trials 1..10."""
    return synthetic.make_synthetic_regdb(tmp_path_factory.mktemp('regdb') / 'RegDB', **SMALL_REGDB)


@pytest.fixture(scope='session')
def synthetic_demo(tmp_path_factory):
    """The default synthetic SYSU-MM01 look-alike (40 training identities, 12 test identities), generated
    and pre-processed as --dataset synthetic does."""
    return prepare_dataset('synthetic', tmp_path_factory.mktemp('data') / 'synthetic')


@pytest.fixture(scope='session')
def seen_ids_tree(tmp_path_factory):
    """A small SYSU-MM01 look-alike whose test identities are its 12 training identities: a network
    trained from scratch for seconds on a CPU cannot generalise to unseen people, but must learn to
    match the infrared and visible images of the people it was trained on."""
    root = synthetic.make_synthetic_sysu(tmp_path_factory.mktemp('seen') / 'SYSU-MM01', seed=1, num_train_ids=12,
                                         num_val_ids=1, num_test_ids=1, images_per_camera=4,
                                         gallery_images_per_camera=4, size=(48, 96))
    train_ids = read_split_ids(root, 'train')
    (root / 'exp' / 'test_id.txt').write_text(','.join(str(pid) for pid in train_ids) + '\n')
    preprocess_sysu(root, progress=False)
    return root
