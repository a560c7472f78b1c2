"""Dataset lists, pre-processing, synthetic generation, datasets and the unpaired sampler."""
import json
import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data_loader  # TestData and test_transform are used through the module: pytest would collect them
import synthetic
from data_loader import CrossModalityData, RegDBData, SYSUData, UnpairedSampler, prepare_dataset, train_transform
from data_manager import (TRAIN_ARRAY_NAMES, parse_sysu_path, process_gallery_sysu,
                          process_query_sysu, process_test_regdb, read_regdb_index, read_split_ids)
from pre_process_sysu import preprocess_sysu
from utils import UserError


def generation_arguments(root):
    """The make_synthetic_sysu arguments a synthetic tree was made with (from its marker file)."""
    description = json.loads((Path(root) / synthetic.MARKER_NAME).read_text())
    description.pop('layout')
    return {**description, 'size': tuple(description['size'])}


def split_ids(root, split):
    return [int(item) for item in (Path(root) / 'exp' / f'{split}_id.txt').read_text().splitlines()[0].split(',')]


def folder_files(root, camera, pid):
    """Sorted full paths of one camK/NNNN folder, built the way the public code builds them."""
    folder = os.path.join(str(root), camera, '%04d' % pid)
    return sorted(folder + '/' + name for name in os.listdir(folder)) if os.path.isdir(folder) else []


# ----------------------------------------------------------------------------- SYSU-MM01 lists

def test_gallery_matches_public_reference_and_leaves_global_rng_alone(sysu_tree):
    for trial in (0, 3):
        random.seed(trial)
        expected = [random.choice(files) for pid in sorted(split_ids(sysu_tree, 'test'))
                    for camera in ('cam1', 'cam2', 'cam4', 'cam5')
                    for files in [folder_files(sysu_tree, camera, pid)] if files]
        random.seed(1234)
        state = random.getstate()
        paths, pids, camids = process_gallery_sysu(sysu_tree, mode='all', trial=trial)
        assert random.getstate() == state
        assert paths == expected
        assert [parse_sysu_path(path) for path in paths] == list(zip(pids.tolist(), camids.tolist()))


def test_gallery_same_trial_same_images_other_trial_differs(sysu_tree):
    first, _, _ = process_gallery_sysu(sysu_tree, trial=1)
    again, _, _ = process_gallery_sysu(sysu_tree, trial=1)
    other, _, _ = process_gallery_sysu(sysu_tree, trial=2)
    assert first == again
    assert first != other
    assert len(first) == len(other) == 4 * generation_arguments(sysu_tree)['num_test_ids']


def test_gallery_multi_shot_and_indoor(sysu_tree):
    paths, pids, camids = process_gallery_sysu(sysu_tree, mode='all', trial=0, shot='multi')
    per_folder = Counter(zip(pids.tolist(), camids.tolist()))
    assert set(per_folder.values()) == {10}
    assert len(per_folder) == 4 * generation_arguments(sysu_tree)['num_test_ids']
    assert len(set(paths)) == len(paths)

    paths, pids, camids = process_gallery_sysu(sysu_tree, mode='indoor', trial=0)
    assert set(camids.tolist()) == {1, 2}
    assert sorted(set(pids.tolist())) == sorted(split_ids(sysu_tree, 'test'))


def test_query_is_every_infrared_test_image_in_order(sysu_tree):
    test_ids = sorted(split_ids(sysu_tree, 'test'))
    expected = [path for pid in test_ids for camera in ('cam3', 'cam6')
                for path in folder_files(sysu_tree, camera, pid)]
    for mode in ('all', 'indoor'):
        paths, pids, camids = process_query_sysu(sysu_tree, mode=mode)
        assert paths == expected
        assert set(camids.tolist()) == {3, 6}
        assert pids.tolist() == sorted(pids.tolist())
        assert sorted(set(pids.tolist())) == test_ids


def test_bad_mode_or_shot_is_a_user_error(sysu_tree):
    with pytest.raises(UserError, match='--mode'):
        process_query_sysu(sysu_tree, mode='outdoor')
    with pytest.raises(UserError, match='--shot'):
        process_gallery_sysu(sysu_tree, shot='double')


def test_parse_sysu_path_reads_folders():
    assert parse_sysu_path('/data/x/cam6/0123/0007.jpg') == (123, 6)


@pytest.mark.parametrize('content', ['', 'hello\n', '1,2,x\n', '1;2;3\n'])
def test_malformed_split_file_is_a_user_error(tmp_path, content):
    (tmp_path / 'exp').mkdir()
    (tmp_path / 'exp' / 'test_id.txt').write_text(content)
    with pytest.raises(UserError, match=r'test_id\.txt.*comma'):
        process_query_sysu(tmp_path)


def test_missing_split_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r'val_id\.txt is missing'):
        read_split_ids(tmp_path, 'val')


# ----------------------------------------------------------------------------- pre-processing

def test_preprocessed_arrays(sysu_preprocessed):
    root = sysu_preprocessed
    train_val = sorted(split_ids(root, 'train') + split_ids(root, 'val'))
    label_of = {pid: label for label, pid in enumerate(train_val)}
    for modality, cameras in (('rgb', ('cam1', 'cam2', 'cam4', 'cam5')), ('ir', ('cam3', 'cam6'))):
        images = np.load(root / f'train_{modality}_resized_img.npy')
        labels = np.load(root / f'train_{modality}_resized_label.npy')
        cams = np.load(root / f'train_{modality}_resized_cam.npy')
        paths = [path for pid in train_val for camera in cameras for path in folder_files(root, camera, pid)]
        assert images.shape == (len(paths), 288, 144, 3) and images.dtype == np.uint8
        assert labels.tolist() == [label_of[parse_sysu_path(path)[0]] for path in paths]
        assert cams.tolist() == [parse_sysu_path(path)[1] for path in paths]
        assert set(labels.tolist()) == set(range(len(train_val)))     # train and val ids, no test id
        for index in (0, len(paths) // 2, len(paths) - 1):
            with Image.open(paths[index]) as source:
                expected = np.asarray(source.convert('RGB').resize((144, 288), Image.Resampling.LANCZOS))
            np.testing.assert_array_equal(images[index], expected)


def test_corrupt_image_is_a_user_error(sysu_tree, tmp_path):
    root = shutil.copytree(sysu_tree, tmp_path / 'sysu')
    broken = next((root / 'cam3').glob('*/*.jpg'))
    broken.write_bytes(b'not a jpeg')
    with pytest.raises(UserError, match=re.escape(str(broken))):
        preprocess_sysu(root, progress=False)


# ----------------------------------------------------------------------------- dataset checks

def test_missing_dataset_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r'SYSU-MM01 not found at .*missing.*github.com/wuancong/SYSU-MM01'):
        prepare_dataset('sysu', tmp_path / 'missing')
    with pytest.raises(UserError, match=r'RegDB not found at .*dongguk'):
        prepare_dataset('regdb', tmp_path / 'missing')
    with pytest.raises(UserError, match='--dataset'):
        prepare_dataset('market', tmp_path)


def test_missing_npy_is_a_user_error(sysu_tree):
    assert prepare_dataset('sysu', sysu_tree) == sysu_tree
    with pytest.raises(UserError, match=r'train_rgb_resized_img\.npy.*python pre_process_sysu\.py --data_path'):
        prepare_dataset('sysu', sysu_tree, need_train_arrays=True)
    with pytest.raises(UserError, match=r'train_rgb_resized_img\.npy'):
        SYSUData(sysu_tree, train_transform())


def test_prepare_synthetic_preprocesses_an_existing_tree(sysu_tree, tmp_path):
    root = shutil.copytree(sysu_tree, tmp_path / 'synthetic')
    assert prepare_dataset('synthetic', root, need_train_arrays=True) == root
    assert all((root / name).is_file() for name in TRAIN_ARRAY_NAMES)


def test_prepare_regdb(regdb_tree):
    assert prepare_dataset('regdb', regdb_tree) == regdb_tree


# ----------------------------------------------------------------------------- RegDB lists

def test_regdb_test_lists(regdb_tree):
    for modal in ('visible', 'thermal'):
        paths, labels = process_test_regdb(regdb_tree, trial=2, modal=modal)
        assert len(paths) == 3 * 3 and all(os.path.isfile(path) for path in paths)
        assert sorted(set(labels.tolist())) == [0, 1, 2]
        assert all(path.startswith(str(regdb_tree) + os.sep + modal.capitalize() + '/') for path in paths)
    with pytest.raises(UserError, match='modality'):
        process_test_regdb(regdb_tree, modal='infrared')


def test_regdb_trials_split_identities(regdb_tree):
    train, _ = read_regdb_index(regdb_tree / 'idx' / 'train_visible_1.txt')
    test, _ = read_regdb_index(regdb_tree / 'idx' / 'test_visible_1.txt')

    def identities(paths):
        return frozenset(path.split('/')[1] for path in paths)

    assert not identities(train) & identities(test)
    splits = {identities(read_regdb_index(regdb_tree / 'idx' / f'train_visible_{trial}.txt')[0])
              for trial in range(1, 11)}
    assert len(splits) > 1


def test_regdb_index_parsing(tmp_path):
    index = tmp_path / 'list.txt'
    index.write_text('Visible/1/a.bmp 0\n\nThermal/2/b.bmp\t 1\n')
    paths, labels = read_regdb_index(index)
    assert paths == ['Visible/1/a.bmp', 'Thermal/2/b.bmp'] and labels.tolist() == [0, 1]
    index.write_text('Visible/1/a.bmp 0\nVisible/1/b.bmp\n')
    with pytest.raises(UserError, match=r'list\.txt, line 2'):
        read_regdb_index(index)
    with pytest.raises(UserError, match='missing'):
        read_regdb_index(tmp_path / 'absent.txt')


# ----------------------------------------------------------------------------- synthetic generation

def test_synthetic_generation_is_deterministic(sysu_tree, tmp_path):
    arguments = generation_arguments(sysu_tree)
    again = synthetic.make_synthetic_sysu(tmp_path / 'again', **arguments)
    files = sorted(path.relative_to(sysu_tree) for path in sysu_tree.rglob('*') if path.is_file()
                   and path.suffix in ('.jpg', '.txt', '.json'))
    assert files == sorted(path.relative_to(again) for path in again.rglob('*') if path.is_file())
    for relative in files[::7]:
        assert (sysu_tree / relative).read_bytes() == (again / relative).read_bytes()
    other = synthetic.make_synthetic_sysu(tmp_path / 'other', **{**arguments, 'seed': arguments['seed'] + 1})
    assert (other / 'cam1').exists()
    sample = next(relative for relative in files if relative.parts[0] == 'cam3')
    if (other / sample).exists():
        assert (other / sample).read_bytes() != (sysu_tree / sample).read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ['again', 'other']   # no partial folder left


def test_synthetic_tree_layout(sysu_tree):
    arguments = generation_arguments(sysu_tree)
    ids = {split: split_ids(sysu_tree, split) for split in ('train', 'val', 'test')}
    all_ids = ids['train'] + ids['val'] + ids['test']
    assert len(set(all_ids)) == len(all_ids)
    assert (sysu_tree / synthetic.MARKER_NAME).is_file()
    for pid in ids['train'] + ids['val']:
        assert any(folder_files(sysu_tree, camera, pid) for camera in ('cam1', 'cam2', 'cam4', 'cam5'))
        assert any(folder_files(sysu_tree, camera, pid) for camera in ('cam3', 'cam6'))
    for pid in ids['test']:
        for camera in ('cam1', 'cam2', 'cam4', 'cam5'):
            assert len(folder_files(sysu_tree, camera, pid)) == arguments['gallery_images_per_camera']
    with Image.open(folder_files(sysu_tree, 'cam3', ids['test'][0])[0]) as infrared:
        assert infrared.size == arguments['size'] and infrared.mode == 'RGB'
        pixels = np.asarray(infrared)
        assert (pixels[..., 0] == pixels[..., 1]).all()


def test_synthetic_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'file.txt').write_text('x')
    with pytest.raises(UserError, match='not an empty folder'):
        synthetic.make_synthetic_sysu(tmp_path / 'taken', num_train_ids=1, num_val_ids=1, num_test_ids=1)


# ----------------------------------------------------------------------------- sampler and datasets

def test_unpaired_sampler_pairs_counts_and_reproducibility():
    torch.manual_seed(0)
    pairs = list(UnpairedSampler(7, 3))
    assert len(pairs) == len(UnpairedSampler(7, 3)) == 7
    assert sorted(visible for visible, _ in pairs) == list(range(7))
    assert all(0 <= thermal < 3 for _, thermal in pairs)
    assert sorted(thermal for _, thermal in pairs[:3]) == [0, 1, 2]
    torch.manual_seed(0)
    assert list(UnpairedSampler(7, 3)) == pairs
    torch.manual_seed(1)
    assert list(UnpairedSampler(7, 3)) != pairs

    long = list(UnpairedSampler(4, 5, num_samples=10))
    assert len(long) == 10
    assert Counter(visible for visible, _ in long[:8]) == Counter({index: 2 for index in range(4)})
    assert sorted(thermal for _, thermal in long[:5]) == list(range(5))


def test_sysu_data_with_unpaired_sampler_and_workers(sysu_preprocessed):
    dataset = SYSUData(sysu_preprocessed, train_transform(288, 144))
    assert len(dataset) == len(dataset.visible_labels) == len(dataset.visible_cams)
    assert set(dataset.thermal_cams.tolist()) <= {3, 6}
    sampler = UnpairedSampler(len(dataset.visible_labels), len(dataset.thermal_labels), num_samples=8)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    visible, thermal, visible_labels, thermal_labels = batches[0]
    assert visible.shape == thermal.shape == (4, 3, 288, 144)
    assert visible_labels.dtype == thermal_labels.dtype == torch.int64


def test_cross_modality_data_at_a_small_size():
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 48, 3), dtype=np.uint8)
    dataset = CrossModalityData(images, np.arange(5), images[:3], np.arange(3), train_transform(96, 48))
    visible, thermal, visible_label, thermal_label = dataset[(4, 2)]
    assert visible.shape == thermal.shape == (3, 96, 48)
    assert (visible_label, thermal_label) == (4, 2)


def test_regdb_data(regdb_tree):
    dataset = RegDBData(regdb_tree, 1, data_loader.test_transform(), img_size=(144, 288))
    assert dataset.visible_images.shape == (9, 288, 144, 3)
    assert dataset.thermal_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    visible, thermal, _, _ = dataset[(0, 8)]
    assert visible.shape == thermal.shape == (3, 288, 144)


def test_query_images_through_test_data(sysu_tree, tmp_path):
    paths, pids, _ = process_query_sysu(sysu_tree)
    dataset = data_loader.TestData(paths, pids, data_loader.test_transform(288, 144), img_size=(144, 288))
    images, labels = next(iter(DataLoader(dataset, batch_size=5, shuffle=False)))
    assert images.shape == (5, 3, 288, 144)
    assert labels.tolist() == pids[:5].tolist()
    with pytest.raises(UserError, match='absent.jpg'):
        data_loader.TestData([str(tmp_path / 'absent.jpg')], [0], data_loader.test_transform())
