"""What lies where in the SYSU-MM01 and RegDB folders: test image lists, split files, and the
checks that tell a user what is missing before a long run starts.

SYSU-MM01 layout (also produced by synthetic.py):
    camK/NNNN/NNNN.jpg        K = 1, 2, 4, 5 visible; K = 3, 6 infrared; NNNN the identity, then the image
    exp/{train,val,test}_id.txt   one line of comma-separated identity numbers
    train_{rgb,ir}_resized_{img,label,cam}.npy   written by pre_process_sysu.py
RegDB layout:
    Visible/..., Thermal/...  the .bmp images, in nested folders
    idx/{train,test}_{visible,thermal}_{trial}.txt   lines `relative/path.bmp label`, trial 1..10
"""
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError, data_path_for

VISIBLE_CAMERAS = ('cam1', 'cam2', 'cam4', 'cam5')
INDOOR_VISIBLE_CAMERAS = ('cam1', 'cam2')
INFRARED_CAMERAS = ('cam3', 'cam6')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')

SYSU_DOWNLOAD = "the authors' request form at https://github.com/wuancong/SYSU-MM01"
REGDB_DOWNLOAD = 'a request to its authors at http://dm.dongguk.edu/link.html'

# The six arrays pre_process_sysu.py writes into the SYSU-MM01 folder.
TRAIN_ARRAY_NAMES = tuple(f'train_{modality}_resized_{kind}.npy'
                          for modality in ('rgb', 'ir') for kind in ('img', 'label', 'cam'))


# ----------------------------------------------------------------------------- SYSU-MM01

def read_split_ids(data_path, split):
    """Identity numbers listed in exp/{split}_id.txt, as ints in file order."""
    path = Path(data_path) / 'exp' / f'{split}_id.txt'
    expected = 'its first line should list identity numbers separated by commas, such as 1,2,4,5'
    if not path.is_file():
        raise UserError(f'SYSU-MM01 split file {path} is missing: {expected}.')
    lines = path.read_text().splitlines()
    # A trailing comma leaves an empty last item: harmless, so it is skipped.
    items = [item.strip() for item in lines[0].split(',')] if lines else []
    items = [item for item in items if item]
    if not items or not all(item.isdigit() for item in items):
        raise UserError(f'SYSU-MM01 split file {path} is malformed: {expected}.')
    return [int(item) for item in items]


def list_sysu_images(data_path, ids, cameras):
    """Lists of image paths (str), one per (identity, camera) folder that exists: identities in
    ascending order, cameras in the order given, paths sorted within a folder."""
    folders = []
    for pid in sorted(ids):
        for camera in cameras:
            folder = os.path.join(str(data_path), camera, f'{pid:04d}')
            if os.path.isdir(folder):
                folders.append(sorted(os.path.join(folder, name) for name in os.listdir(folder)
                                      if name.lower().endswith(IMAGE_SUFFIXES)))
    return folders


def parse_sysu_path(path):
    """(identity, camera number) of a `.../camK/NNNN/image.jpg` path."""
    path = Path(path)
    return int(path.parent.name), int(path.parent.parent.name[len('cam'):])


def _labelled(paths):
    """The (paths, pids, camids) triple the test code expects."""
    parsed = [parse_sysu_path(path) for path in paths]
    pids = np.array([pid for pid, _ in parsed], dtype=np.int64)
    camids = np.array([camid for _, camid in parsed], dtype=np.int64)
    return list(paths), pids, camids


def _check_mode(mode):
    if mode not in ('all', 'indoor'):
        raise UserError(f'--mode {mode!r} is not known: use all or indoor.')


def process_query_sysu(data_path, mode='all'):
    """Query set: every infrared test image (cam3, cam6 in both modes).

    Returns (paths: list of str, pids: (N,) int64, camids: (N,) int64).
    """
    _check_mode(mode)
    folders = list_sysu_images(data_path, read_split_ids(data_path, 'test'), INFRARED_CAMERAS)
    return _labelled([path for folder in folders for path in folder])


def process_gallery_sysu(data_path, mode='all', trial=0, shot='single'):
    """Gallery of one evaluation trial: from each (test identity, visible camera) folder, one image
    (single-shot) or ten (multi-shot; all of them when fewer), drawn at random with seed `trial`.

    A private random.Random(trial) gives the same draws as the public code's global
    `random.seed(trial)` without disturbing the global generator.
    mode 'all' uses cam1, cam2, cam4, cam5; 'indoor' only cam1, cam2.
    Returns (paths: list of str, pids: (N,) int64, camids: (N,) int64).
    """
    _check_mode(mode)
    if shot not in ('single', 'multi'):
        raise UserError(f'--shot {shot!r} is not known: use single or multi.')
    cameras = VISIBLE_CAMERAS if mode == 'all' else INDOOR_VISIBLE_CAMERAS
    draw = random.Random(trial)
    gallery = []
    for folder in list_sysu_images(data_path, read_split_ids(data_path, 'test'), cameras):
        if shot == 'single':
            gallery.append(draw.choice(folder))
        else:
            gallery.extend(draw.sample(folder, min(10, len(folder))))
    return _labelled(gallery)


def train_array_paths(data_path):
    """The six pre-processed training arrays, by file name; a missing one is a UserError."""
    paths = {name: Path(data_path) / name for name in TRAIN_ARRAY_NAMES}
    for path in paths.values():
        if not path.is_file():
            raise UserError(f'Pre-processed training array {path} is missing: '
                            f'run `python pre_process_sysu.py --data_path {data_path}` first.')
    return paths


# ----------------------------------------------------------------------------- RegDB

def read_regdb_index(path):
    """An idx/*.txt list of RegDB: (relative image paths: list of str, labels: (N,) int64).

    Each non-blank line is `relative/path.bmp label`, separated by white space.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'RegDB index file {path} is missing: check --data_path and --trial (1 to 10).')
    image_paths, labels = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip('-').isdigit():
            raise UserError(f'RegDB index file {path}, line {line_number}, is malformed: '
                            f"expected 'relative/path.bmp label', got {line.strip()!r}.")
        image_paths.append(fields[0])
        labels.append(int(fields[1]))
    if not image_paths:
        raise UserError(f"RegDB index file {path} lists no images: it should hold lines 'relative/path.bmp label'.")
    return image_paths, np.array(labels, dtype=np.int64)


def process_test_regdb(data_path, trial=1, modal='visible'):
    """Test images of one RegDB trial and modality: (full paths: list of str, labels: (N,) int64)."""
    if modal not in ('visible', 'thermal'):
        raise UserError(f'RegDB modality {modal!r} is not known: use visible or thermal.')
    image_paths, labels = read_regdb_index(Path(data_path) / 'idx' / f'test_{modal}_{trial}.txt')
    return [os.path.join(str(data_path), image_path) for image_path in image_paths], labels


# ----------------------------------------------------------------------------- images and checks

def read_image(path, size):
    """One image file as RGB, resized with Lanczos to size=(width, height): (height, width, 3) uint8."""
    try:
        with Image.open(path) as image:
            resized = image.convert('RGB').resize(tuple(size), Image.Resampling.LANCZOS)
    except (OSError, ValueError) as error:
        raise UserError(f'Cannot read image {path} ({error}): replace or remove the file.')
    return np.asarray(resized, dtype=np.uint8)


def dataset_folder(dataset, data_path=None, need_train_arrays=False):
    """The folder of `dataset` (sysu, regdb or synthetic), checked to hold what a run needs.

    need_train_arrays: also require the pre-processed SYSU-MM01 training arrays. The synthetic set
    is checked like SYSU-MM01: data_loader.prepare_dataset generates it first.
    """
    if dataset not in ('sysu', 'regdb', 'synthetic'):
        raise UserError(f'--dataset {dataset!r} is not known: use sysu, regdb or synthetic.')
    folder = data_path_for(dataset, data_path)
    if dataset == 'regdb':
        if not all((folder / name).is_dir() for name in ('Visible', 'Thermal', 'idx')):
            raise UserError(f'RegDB not found at {folder} (it needs Visible/, Thermal/ and idx/): '
                            f'get it through {REGDB_DOWNLOAD} (see README) and pass --data_path.')
        return folder
    if not (folder / 'exp').is_dir():
        raise UserError(f'SYSU-MM01 not found at {folder}: download it from {SYSU_DOWNLOAD} '
                        f'(see README) and pass --data_path.')
    if need_train_arrays:
        train_array_paths(folder)
    return folder
