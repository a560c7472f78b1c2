"""Pack the SYSU-MM01 training images (train + val identities) into arrays, once, so that training
reads them from memory:

    python pre_process_sysu.py --data_path data/SYSU-MM01

writes into that folder train_{rgb,ir}_resized_img.npy (N, 288, 144, 3) uint8,
train_{rgb,ir}_resized_label.npy (N,) identities relabelled 0..K-1 in ascending identity order,
and train_{rgb,ir}_resized_cam.npy (N,) camera numbers.
"""
import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_manager import (INFRARED_CAMERAS, VISIBLE_CAMERAS, dataset_folder, list_sysu_images, parse_sysu_path,
                          read_image, read_split_ids)
from utils import UserError, data_path_for, run_main, save_array

IMAGE_WIDTH, IMAGE_HEIGHT = 144, 288


def read_images(paths, description, progress):
    """All `paths` resized to IMAGE_WIDTH x IMAGE_HEIGHT: (N, IMAGE_HEIGHT, IMAGE_WIDTH, 3) uint8."""
    # Filled in place: stacking a list would need twice the memory (about 3 GB for SYSU-MM01).
    images = np.empty((len(paths), IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    for index, path in enumerate(tqdm(paths, desc=description, unit='img', disable=not progress)):
        images[index] = read_image(path, (IMAGE_WIDTH, IMAGE_HEIGHT))
    return images


def preprocess_sysu(data_path, progress=True):
    """Write the six training arrays into `data_path`; returns {'visible': N, 'infrared': M,
    'identities': K}, the counts of images and identities written."""
    data_path = Path(data_path)
    ids = sorted(set(read_split_ids(data_path, 'train')) | set(read_split_ids(data_path, 'val')))
    paths = {modality: [path for folder in list_sysu_images(data_path, ids, cameras) for path in folder]
             for modality, cameras in (('rgb', VISIBLE_CAMERAS), ('ir', INFRARED_CAMERAS))}
    if not paths['rgb'] or not paths['ir']:
        raise UserError(f'No training images found under {data_path} for the identities of '
                        f'exp/train_id.txt and exp/val_id.txt: it should hold camK/NNNN/*.jpg folders.')
    parsed = {modality: [parse_sysu_path(path) for path in modality_paths]
              for modality, modality_paths in paths.items()}
    present_ids = sorted({pid for modality_parsed in parsed.values() for pid, _ in modality_parsed})
    label_of_id = {pid: label for label, pid in enumerate(present_ids)}

    for modality, description in (('rgb', 'visible'), ('ir', 'infrared')):
        labels = np.array([label_of_id[pid] for pid, _ in parsed[modality]], dtype=np.int64)
        cameras = np.array([camera for _, camera in parsed[modality]], dtype=np.int64)
        images = read_images(paths[modality], description, progress)
        save_array(images, data_path / f'train_{modality}_resized_img.npy')
        save_array(labels, data_path / f'train_{modality}_resized_label.npy')
        save_array(cameras, data_path / f'train_{modality}_resized_cam.npy')
    return {'visible': len(paths['rgb']), 'infrared': len(paths['ir']), 'identities': len(present_ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data_path', default=None,
                        help=f'SYSU-MM01 folder (default: {data_path_for("sysu")})')
    args = parser.parse_args()
    data_path = dataset_folder('sysu', args.data_path)
    counts = preprocess_sysu(data_path)
    print(f'Wrote {counts["visible"]} visible and {counts["infrared"]} infrared images of '
          f'{counts["identities"]} identities into {data_path}.')


if __name__ == '__main__':
    run_main(main)
