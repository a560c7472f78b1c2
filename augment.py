"""Batched training augmentation on the device the images are on (GPU when present, CPU otherwise).

Does what data_loader.train_transform does to one image at a time with PIL (resize, zero padding,
random crop, random horizontal flip, ToTensor, ImageNet normalisation), but for a whole uint8
batch at once, so that the training arrays, which are already uint8 in memory, need no per-image
PIL work in the loader workers.
"""
import functools

import torch
import torch.nn.functional as F

from data_loader import IMAGENET_MEAN, IMAGENET_STD, train_padding


def _resize(images, img_h, img_w):
    """uint8 (B, 3, H, W) -> uint8 (B, 3, img_h, img_w), bilinear with antialias.

    Computed in float on the 0..255 scale, as torchvision's tensor Resize does, then rounded and
    clamped back to uint8 values, as PIL's resize of a uint8 image gives integers."""
    if images.shape[2:] == (img_h, img_w):
        return images  # PIL's resize to the same size is a plain copy
    resized = F.interpolate(images.float(), size=(img_h, img_w), mode='bilinear', align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _normalisation(device):
    """The ImageNet mean and std as (1, 3, 1, 1) float32 tensors on `device`, copied there once:
    every copy from host memory would make the host wait for the GPU."""
    return tuple(torch.tensor(values).view(1, 3, 1, 1).to(device) for values in (IMAGENET_MEAN, IMAGENET_STD))


def augment_batch(images, img_h, img_w, crop_top, crop_left, flip):
    """Resize, zero-pad, crop, flip and normalise a batch with given random choices.

    images: uint8 (B, H, W, 3), channels last, as a DataLoader collates the training arrays.
    crop_top, crop_left: int64 (B,), in [0, 2 * train_padding(img_h)]: top-left corner of the
    img_h x img_w crop in the padded image. flip: bool (B,), True to flip horizontally.
    Returns float32 (B, 3, img_h, img_w), contiguous, on the images' device, normalised with the ImageNet
    mean and std: image b equals train_transform(img_h, img_w)(images[b]) when its RandomCrop
    drew (crop_top[b], crop_left[b]) and its RandomHorizontalFlip drew flip[b].
    """
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f'augment_batch expects uint8 images of shape (B, H, W, 3), '
                         f'got {images.dtype} {tuple(images.shape)}.')
    device = images.device
    padding = train_padding(img_h)
    images = _resize(images.permute(0, 3, 1, 2), img_h, img_w)  # (B, 3, img_h, img_w), a view of channels-last memory
    # Pad in raw pixel space, before normalising, so that a padded pixel ends up at
    # (0 - mean) / std, as PIL's Pad(fill=0) followed by ToTensor and Normalize gives.
    padded = F.pad(images, (padding, padding, padding, padding))

    # Crop and flip in one gather: output pixel (b, c, i, j) reads padded pixel
    # (b, c, crop_top[b] + i, crop_left[b] + j), with j mirrored (img_w - 1 - j) for flipped images.
    # Indexing every dimension gives a tensor in the standard (B, 3, h, w) layout, so the network
    # runs in the same memory format as with the loader's augmentation (channels-last only with
    # --channels_last): the place of the augmentation changes nothing else.
    crop_top, crop_left, flip = crop_top.to(device), crop_left.to(device), flip.to(device)
    rows = crop_top[:, None] + torch.arange(img_h, device=device)                # (B, img_h)
    cols = torch.arange(img_w, device=device).expand(len(flip), img_w)
    cols = crop_left[:, None] + torch.where(flip[:, None], img_w - 1 - cols, cols)  # (B, img_w)
    batch = torch.arange(len(padded), device=device)[:, None, None, None]
    channel = torch.arange(3, device=device)[None, :, None, None]
    cropped = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (B, 3, img_h, img_w)

    # The same operations as ToTensor (/255) and Normalize (sub mean, div std), so the result
    # matches the PIL path bit for bit.
    mean, std = _normalisation(device)
    return cropped.float().div(255).sub(mean).div(std)


def random_augment(images, img_h, img_w, generator=None):
    """augment_batch with random choices drawn as train_transform draws them: crop offsets uniform
    in [0, 2 * train_padding(img_h)], a horizontal flip with probability 0.5.

    images: uint8 (B, H, W, 3). The draws are made on the images' device, from generator (a
    torch.Generator on that device) or torch's default generator of that device.
    Returns float32 (B, 3, img_h, img_w).
    """
    size, device = (len(images),), images.device
    offsets = 2 * train_padding(img_h) + 1
    crop_top = torch.randint(0, offsets, size, device=device, generator=generator)
    crop_left = torch.randint(0, offsets, size, device=device, generator=generator)
    flip = torch.rand(size, device=device, generator=generator) < 0.5
    return augment_batch(images, img_h, img_w, crop_top, crop_left, flip)
