"""Datasets, transforms and the samplers that feed the networks, and the dataset folder a run uses.

Training datasets hold a visible and a thermal (infrared) image set side by side; an item is
addressed by a pair (visible_index, thermal_index) that a sampler chooses, and comes back as
(visible_tensor, thermal_tensor, visible_label, thermal_label).
"""
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as transforms
from torch.utils.data import Dataset, Sampler

from data_manager import dataset_folder, read_image, read_regdb_index, train_array_paths
from synthetic import ensure_synthetic_sysu
from utils import UserError, data_path_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_dataset(dataset, data_path=None, need_train_arrays=False):
    """The checked folder of `dataset` (data_manager.dataset_folder); 'synthetic', a SYSU-MM01
    look-alike, is generated and pre-processed first if it is not there yet."""
    if dataset == 'synthetic':
        ensure_synthetic_sysu(data_path_for(dataset, data_path))
    return dataset_folder(dataset, data_path, need_train_arrays)


def train_padding(img_h):
    """Pixels of zero padding on every side before the training crop: 10 at the default height 288,
    scaled with the height, at least 1."""
    return max(1, round(10 * img_h / 288))


def train_transform(img_h=288, img_w=144):
    """uint8 (H, W, 3) array -> normalised (3, img_h, img_w) tensor, with pad + random crop and
    horizontal flip (augment.random_augment does the same to a batch on the device)."""
    padding = train_padding(img_h)
    return transforms.Compose([
        transforms.ToPILImage(),
        transforms.Resize((img_h, img_w)),
        transforms.Pad(padding),
        transforms.RandomCrop((img_h, img_w)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def as_uint8_tensor(image):
    """The loader's transform when the augmentation runs on the device (augment.py): the uint8
    (H, W, 3) array as a tensor, unchanged, so that batches travel as uint8."""
    return torch.from_numpy(np.ascontiguousarray(image))


def test_transform(img_h=288, img_w=144):
    """uint8 (H, W, 3) array -> normalised (3, img_h, img_w) tensor."""
    return transforms.Compose([
        transforms.ToPILImage(),
        transforms.Resize((img_h, img_w)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class CrossModalityData(Dataset):
    """Visible and thermal training images; item (visible_index, thermal_index) ->
    (visible (3, h, w) tensor, thermal (3, h, w) tensor, visible label, thermal label).

    visible_images: (Nv, H, W, 3) uint8, visible_labels: (Nv,); likewise thermal with Nt.
    The length is Nv, the number of visible images, as in the public code.
    """

    def __init__(self, visible_images, visible_labels, thermal_images, thermal_labels, transform):
        self.visible_images = visible_images
        self.visible_labels = np.asarray(visible_labels)
        self.thermal_images = thermal_images
        self.thermal_labels = np.asarray(thermal_labels)
        self.transform = transform

    def __getitem__(self, pair):
        visible_index, thermal_index = pair
        return (self.transform(self.visible_images[visible_index]),
                self.transform(self.thermal_images[thermal_index]),
                int(self.visible_labels[visible_index]),
                int(self.thermal_labels[thermal_index]))

    def __len__(self):
        return len(self.visible_labels)


class DeviceArrays:
    """The images and labels of a CrossModalityData whose transform is as_uint8_tensor, copied once to
    the device (--data_on_device), with the numpy labels the samplers read. Its loaders gather each
    batch there: no loader processes and no copy from host memory per batch."""

    def __init__(self, dataset, device):
        self.visible_labels, self.thermal_labels = dataset.visible_labels, dataset.thermal_labels
        self.on_device = {name: torch.as_tensor(array).to(device) for name, array in (
            ('visible_images', dataset.visible_images), ('thermal_images', dataset.thermal_images),
            ('visible_labels', dataset.visible_labels.astype(np.int64)),
            ('thermal_labels', dataset.thermal_labels.astype(np.int64)))}

    @property
    def nbytes(self):
        return sum(tensor.nbytes for tensor in self.on_device.values())

    def __len__(self):
        return len(self.visible_labels)


class DeviceLoader:
    """The batches a DataLoader(dataset, batch_size, sampler=sampler, drop_last=True) gives over the
    dataset that `arrays` (DeviceArrays) holds, the same values in the same order, gathered on the
    device: (visible uint8 (B, H, W, 3), thermal uint8 (B, H, W, 3), visible labels (B,), thermal
    labels (B,)), labels int64. The sampler is drawn when the loader is iterated, as a DataLoader does."""

    def __init__(self, arrays, sampler, batch_size):
        self.arrays, self.sampler, self.batch_size = arrays, sampler, batch_size

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        # A DataLoader draws its workers' seed from torch's generator before the sampler's draw; so does
        # this loader, so that a run draws the same images and augmentations with --data_on_device as without.
        torch.empty((), dtype=torch.int64).random_()
        arrays = self.arrays.on_device
        pairs = torch.tensor(list(self.sampler), dtype=torch.int64).reshape(-1, 2)
        pairs = pairs[:len(self) * self.batch_size].to(arrays['visible_images'].device)  # one copy an epoch
        for batch in pairs.split(self.batch_size):
            visible, thermal = batch.unbind(1)
            # index_select copies whole images (on a CPU 15 times faster than indexing, which goes byte by byte)
            yield (arrays['visible_images'].index_select(0, visible), arrays['thermal_images'].index_select(0, thermal),
                   arrays['visible_labels'].index_select(0, visible), arrays['thermal_labels'].index_select(0, thermal))


class SYSUData(CrossModalityData):
    """SYSU-MM01 training set from the arrays of pre_process_sysu.py; also keeps the camera
    number of every image in visible_cams, thermal_cams."""

    def __init__(self, data_path, transform):
        paths = train_array_paths(data_path)
        arrays = {name: np.load(path) for name, path in paths.items()}
        for modality in ('rgb', 'ir'):
            lengths = {len(arrays[f'train_{modality}_resized_{kind}.npy']) for kind in ('img', 'label', 'cam')}
            if len(lengths) != 1:
                raise UserError(f'The train_{modality}_resized_*.npy arrays in {data_path} disagree in length: '
                                f'run `python pre_process_sysu.py --data_path {data_path}` again.')
        super().__init__(arrays['train_rgb_resized_img.npy'], arrays['train_rgb_resized_label.npy'],
                         arrays['train_ir_resized_img.npy'], arrays['train_ir_resized_label.npy'], transform)
        self.visible_cams = arrays['train_rgb_resized_cam.npy']
        self.thermal_cams = arrays['train_ir_resized_cam.npy']


class RegDBData(CrossModalityData):
    """RegDB training set of one trial (1..10), every image loaded, RGB, resized with Lanczos to
    img_size=(width, height)."""

    def __init__(self, data_path, trial, transform, img_size=(144, 288)):
        data_path = Path(data_path)
        loaded = {}
        for modality in ('visible', 'thermal'):
            image_paths, labels = read_regdb_index(data_path / 'idx' / f'train_{modality}_{trial}.txt')
            images = np.stack([read_image(data_path / image_path, img_size) for image_path in image_paths])
            loaded[modality] = (images, labels)
        super().__init__(*loaded['visible'], *loaded['thermal'], transform)


class TestData(Dataset):
    """Query or gallery images, loaded once into memory (RGB, Lanczos-resized to
    img_size=(width, height)); item i -> ((3, h, w) tensor, label)."""

    def __init__(self, paths, labels, transform, img_size=(144, 288)):
        if len(paths) == 0:
            raise UserError('No test images to load: check the test split of the dataset (--data_path).')
        self.images = np.stack([read_image(path, img_size) for path in paths])
        self.labels = np.asarray(labels)
        self.transform = transform

    def __getitem__(self, index):
        return self.transform(self.images[index]), int(self.labels[index])

    def __len__(self):
        return len(self.images)


class UnpairedSampler(Sampler):
    """Random (visible_index, thermal_index) pairs for self-supervised pre-training: identities are
    never looked at, so a visible image is paired with an arbitrary thermal one.

    Yields num_samples pairs (default num_visible): visible indices run through fresh
    torch.randperm(num_visible) permutations, thermal ones through fresh torch.randperm(num_thermal)
    permutations, one after the other. Draws from torch's global generator, so torch.manual_seed or
    a restored RNG state reproduces the order.
    """

    def __init__(self, num_visible, num_thermal, num_samples=None):
        if num_visible < 1 or num_thermal < 1:
            raise ValueError(f'UnpairedSampler needs images of both modalities, '
                             f'got {num_visible} visible and {num_thermal} thermal.')
        self.num_visible = num_visible
        self.num_thermal = num_thermal
        self.num_samples = num_visible if num_samples is None else num_samples

    def _permuted_indices(self, population):
        """num_samples indices in [0, population): permutations of the population, concatenated."""
        rounds = max(1, -(-self.num_samples // population))
        return torch.cat([torch.randperm(population) for _ in range(rounds)])[:self.num_samples]

    def __iter__(self):
        visible = self._permuted_indices(self.num_visible).tolist()
        thermal = self._permuted_indices(self.num_thermal).tolist()
        return iter(zip(visible, thermal))

    def __len__(self):
        return self.num_samples


class IdentitySampler(Sampler):
    """Identity-balanced (visible_index, thermal_index) pairs for fine-tuning with identity labels.

    Each batch of batch_size * num_pos pairs holds batch_size distinct identities (present in both
    modalities), drawn without replacement; each identity contributes num_pos consecutive pairs of
    one of its visible and one of its thermal images, both drawn with replacement. So a loader with
    batch_size=batch_size * num_pos gives batches whose visible and thermal halves carry the same
    labels in the same order. An epoch has int(N / (batch_size * num_pos)) + 1 batches, N the larger
    of the two image counts, as in the public AGW/DDAG code.

    The indices are drawn when the sampler is built, from numpy's global generator (np.random.choice,
    the public order of draws), so utils.set_seed or utils.set_rng_state reproduces them: build one
    sampler per epoch.
    visible_labels: (Nv,) and thermal_labels: (Nt,) integer labels.
    """

    def __init__(self, visible_labels, thermal_labels, num_pos, batch_size):
        visible_labels, thermal_labels = np.asarray(visible_labels), np.asarray(thermal_labels)
        identities = np.intersect1d(visible_labels, thermal_labels)
        if num_pos < 1 or batch_size < 1:
            raise UserError(f'--num_pos ({num_pos}) and --batch-size ({batch_size}) must be at least 1.')
        if len(identities) < batch_size:
            raise UserError(f'--batch-size {batch_size} identities per batch, but only {len(identities)} training '
                            f'identities have both visible and thermal images: lower --batch-size.')
        visible_positions = {label: np.flatnonzero(visible_labels == label) for label in identities}
        thermal_positions = {label: np.flatnonzero(thermal_labels == label) for label in identities}
        self.num_pos, self.batch_size = num_pos, batch_size
        self.num_batches = int(max(len(visible_labels), len(thermal_labels)) / (batch_size * num_pos)) + 1
        visible, thermal = [], []
        for _ in range(self.num_batches):
            for label in np.random.choice(identities, batch_size, replace=False):
                visible.append(np.random.choice(visible_positions[label], num_pos))
                thermal.append(np.random.choice(thermal_positions[label], num_pos))
        self.visible_indices = np.concatenate(visible)
        self.thermal_indices = np.concatenate(thermal)

    def __iter__(self):
        return iter(zip(self.visible_indices.tolist(), self.thermal_indices.tolist()))

    def __len__(self):
        return len(self.visible_indices)


class RankShare(Sampler):
    """One process's share of a sampler's draw under torchrun: the draw is cut into batches of
    batch_size consecutive items, and process `rank` of `world_size` takes batches rank,
    rank + world_size, ... Every process makes the same draw (same seed, same generator states), so
    the shares are disjoint and together cover it; the last incomplete round of batches is dropped,
    so every process runs the same number of steps, and so are the rounds beyond a multiple of
    accum_iter, so that an epoch holds whole optimiser steps of accum_iter batches (--accum_iter).
    With several processes the draw is made when the share is built (engine.fit seeds every process
    alike just for it); with world_size 1 it is made when iterated, and the share is the sampler
    itself, less the items beyond the last whole step."""

    def __init__(self, sampler, batch_size, rank=0, world_size=1, accum_iter=1):
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size
        self.accum_iter = accum_iter
        self.draw = list(sampler) if world_size > 1 else None

    def _rounds(self, items):
        """Rounds of world_size batches to take: whole optimiser steps' worth."""
        return items // (self.batch_size * self.world_size * self.accum_iter) * self.accum_iter

    def __iter__(self):
        items = self.draw if self.draw is not None else list(self.sampler)
        for batch in range(self.rank, self._rounds(len(items)) * self.world_size, self.world_size):
            yield from items[batch * self.batch_size:(batch + 1) * self.batch_size]

    def __len__(self):
        return self._rounds(len(self.sampler)) * self.batch_size
