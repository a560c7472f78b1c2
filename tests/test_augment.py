"""Batched device augmentation (augment.py) against the per-image PIL path of train_transform."""
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image

import augment
from augment import augment_batch, random_augment, train_padding
from data_loader import IMAGENET_MEAN, IMAGENET_STD, train_transform

IMG_H, IMG_W = 96, 48
PADDING = train_padding(IMG_H)  # 3


def random_images(count, height, width, seed=0):
    """uint8 (count, height, width, 3) noise: every pixel differs, so any misplaced pixel shows."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def pil_path(array, crop_top, crop_left, flip, img_h=IMG_H, img_w=IMG_W):
    """train_transform's steps on one uint8 (H, W, 3) array with the random draws fixed."""
    image = Image.fromarray(array)
    image = transforms.Resize((img_h, img_w))(image)
    image = transforms.Pad(train_padding(img_h))(image)
    image = TF.crop(image, crop_top, crop_left, img_h, img_w)
    if flip:
        image = TF.hflip(image)
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(image))


def all_choices():
    """Every (crop_top, crop_left, flip) that train_transform(IMG_H, IMG_W) can draw."""
    offsets = range(2 * PADDING + 1)
    return list(itertools.product(offsets, offsets, (False, True)))


def grey_levels(first, second):
    """Absolute difference of two normalised (B, 3, h, w) batches on the 0..255 pixel scale."""
    std = torch.tensor(IMAGENET_STD, device=first.device).view(1, 3, 1, 1)
    return ((first - second) * std * 255).abs()


def as_tensors(choices):
    tops, lefts, flips = zip(*choices)
    return torch.tensor(tops), torch.tensor(lefts), torch.tensor(flips)


def test_padding_is_ten_pixels_at_288_scaled_with_the_height():
    expected = {10: 1, 20: 1, 96: 3, 110: 4, 144: 5, 256: 9, 288: 10, 384: 13}  # 110, 256: rounded up
    for img_h, padding in expected.items():
        pads = [t for t in train_transform(img_h, img_h // 2).transforms if isinstance(t, transforms.Pad)]
        assert train_padding(img_h) == pads[0].padding == padding, img_h


def test_augment_batch_equals_pil_path_at_target_size():
    """Hand-chosen crops (corners, centre, off-centre) and flips, all in one batched call: each image
    must equal the PIL path exactly, padded border included."""
    choices = [(0, 0, False), (0, 0, True), (2 * PADDING, 2 * PADDING, False), (2 * PADDING, 0, True),
               (PADDING, PADDING, False), (PADDING, PADDING, True), (1, 5, False), (6, 2, True)]
    arrays = random_images(len(choices), IMG_H, IMG_W)
    out = augment_batch(torch.from_numpy(arrays), IMG_H, IMG_W, *as_tensors(choices))
    assert out.shape == (len(choices), 3, IMG_H, IMG_W) and out.dtype == torch.float32
    assert out.is_contiguous()  # the layout the loader's path gives, whatever the uint8 input's layout
    for array, choice, result in zip(arrays, choices, out):
        assert torch.equal(result, pil_path(array, *choice)), choice


def test_padded_border_is_normalised_zero():
    """A crop at (0, 0) shows PADDING rows and columns of padding: black pixels, normalised."""
    images = torch.full((1, IMG_H, IMG_W, 3), 255, dtype=torch.uint8)
    out = augment_batch(images, IMG_H, IMG_W, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    white = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    assert torch.allclose(out[0, :, :PADDING, :], black.expand(3, PADDING, IMG_W))
    assert torch.allclose(out[0, :, :, :PADDING], black.expand(3, IMG_H, PADDING))
    assert torch.allclose(out[0, :, PADDING:, PADDING:], white.expand(3, IMG_H - PADDING, IMG_W - PADDING))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_train_transform_output_is_reachable(seed):
    """What train_transform itself draws is one of augment_batch's outputs over the allowed range
    of offsets and flips: the two implement the same augmentation."""
    array = random_images(1, IMG_H, IMG_W, seed=seed)[0]
    torch.manual_seed(seed)
    expected = train_transform(IMG_H, IMG_W)(array)
    choices = all_choices()
    images = torch.from_numpy(array).expand(len(choices), IMG_H, IMG_W, 3)
    out = augment_batch(images, IMG_H, IMG_W, *as_tensors(choices))
    matches = [choice for choice, result in zip(choices, out) if torch.equal(result, expected)]
    assert len(matches) == 1, matches  # noise images: no two crops coincide


def test_resize_is_close_to_pil():
    """288 x 144 arrays resized to 96 x 48 (centre crop, no flip, so only the resize acts): close to
    PIL's antialiased bilinear resize, a rounding difference of one grey level at a few pixels."""
    arrays = random_images(4, 288, 144)
    count = len(arrays)
    centre = torch.full((count,), PADDING)
    out = augment_batch(torch.from_numpy(arrays), IMG_H, IMG_W, centre, centre, torch.zeros(count, dtype=torch.bool))
    # train_transform without its random steps (Pad + RandomCrop at the centre is the identity).
    deterministic = transforms.Compose([t for t in train_transform(IMG_H, IMG_W).transforms if not isinstance(
        t, (transforms.Pad, transforms.RandomCrop, transforms.RandomHorizontalFlip))])
    expected = torch.stack([deterministic(array) for array in arrays])
    difference = grey_levels(out, expected)
    assert difference.mean() < 0.25  # about 0.11 here; truncating instead of rounding gives 0.5
    assert difference.max() < 1.0 + 1e-3  # rounding may differ, never by more than a level
    # The pad/crop/flip path still agrees with PIL's after the resize.
    choices = [(0, 6, True), (4, 1, False), (6, 6, True), (2, 0, False)]
    out = augment_batch(torch.from_numpy(arrays), IMG_H, IMG_W, *as_tensors(choices))
    expected = torch.stack([pil_path(array, *choice) for array, choice in zip(arrays, choices)])
    assert grey_levels(out, expected).max() < 1.0 + 1e-3


def test_random_augment_draws(monkeypatch):
    """Offsets cover [0, 2p] and nothing else, flips come at about half the images."""
    drawn = {}

    def spy(images, img_h, img_w, crop_top, crop_left, flip):
        drawn.update(crop_top=crop_top, crop_left=crop_left, flip=flip)

    monkeypatch.setattr(augment, 'augment_batch', spy)
    count = 4000
    images = torch.zeros(1, IMG_H, IMG_W, 3, dtype=torch.uint8).expand(count, -1, -1, -1)
    random_augment(images, IMG_H, IMG_W, generator=torch.Generator().manual_seed(0))
    for name in ('crop_top', 'crop_left'):
        offsets = drawn[name]
        assert offsets.shape == (count,) and offsets.dtype == torch.int64
        assert sorted(offsets.unique().tolist()) == list(range(2 * PADDING + 1)), name
    flip = drawn['flip']
    assert flip.shape == (count,) and flip.dtype == torch.bool
    assert abs(flip.float().mean().item() - 0.5) < 0.05  # 6 standard deviations at 4000 draws
    # Top, left and flip are independent draws, not one value reused.
    assert not torch.equal(drawn['crop_top'], drawn['crop_left'])


def test_random_augment_is_reproducible():
    images = torch.from_numpy(random_images(8, IMG_H, IMG_W))
    first = random_augment(images, IMG_H, IMG_W, generator=torch.Generator().manual_seed(5))
    again = random_augment(images, IMG_H, IMG_W, generator=torch.Generator().manual_seed(5))
    other = random_augment(images, IMG_H, IMG_W, generator=torch.Generator().manual_seed(6))
    assert first.shape == (8, 3, IMG_H, IMG_W)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every image is one of train_transform's possible outputs.
    choices = all_choices()
    for image, result in zip(images, first):
        candidates = augment_batch(image.expand(len(choices), -1, -1, -1), IMG_H, IMG_W, *as_tensors(choices))
        assert (candidates == result).flatten(1).all(1).any()


def test_rejects_wrong_layout():
    images = torch.zeros(2, 3, IMG_H, IMG_W, dtype=torch.uint8)  # channels first
    zeros = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match='uint8 images of shape'):
        augment_batch(images, IMG_H, IMG_W, zeros, zeros, zeros.bool())
    with pytest.raises(ValueError, match='uint8 images of shape'):
        augment_batch(images.permute(0, 2, 3, 1).float(), IMG_H, IMG_W, zeros, zeros, zeros.bool())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    """Same choices, same result on the GPU (resize included), and random_augment stays on it."""
    images = torch.from_numpy(random_images(4, 288, 144))
    choices = as_tensors([(0, 6, True), (4, 1, False), (6, 6, True), (2, 0, False)])
    on_cpu = augment_batch(images, IMG_H, IMG_W, *choices)
    on_gpu = augment_batch(images.cuda(), IMG_H, IMG_W, *choices)
    assert on_gpu.is_cuda
    assert grey_levels(on_gpu.cpu(), on_cpu).max() < 1.0 + 1e-3
    out = random_augment(images.cuda(), IMG_H, IMG_W, generator=torch.Generator('cuda').manual_seed(0))
    assert out.is_cuda and out.shape == (4, 3, IMG_H, IMG_W)
