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
from data_manager import prepare_dataset  # noqa: E402
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
