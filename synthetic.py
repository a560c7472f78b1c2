"""Synthetic look-alikes of SYSU-MM01 and RegDB, generated once from a seed, so that
`--dataset synthetic` and the tests run on a fresh machine with nothing to download:

    python synthetic.py [--data_path DIR] [--sheet samples.png]

Every image is a drawn person. Each identity has its own body proportions, hair, clothing colours
and patterns, belt, shoes and bag; each camera its own scene and light; each image its own small
shift, scale, stride, arm swing and view (front or back). A person is first drawn as a map of body
parts; the visible image colours the parts, the infrared image gives them temperatures (warm skin,
clothing by its emissivity, cool shoes and bags) against a darker scene, blurred and noisy, so the two
modalities share shapes but not pixel values. From head to ground the content differs (hair and face,
neck and shoulders, torso, belt and hands, knees, shoes on the floor), so each of six horizontal
stripes of an image can be told apart. Same seed and arguments, same bytes.
"""
import argparse
import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from data_manager import INFRARED_CAMERAS, TRAIN_ARRAY_NAMES, VISIBLE_CAMERAS, read_split_ids
from pre_process_sysu import preprocess_sysu
from utils import UserError, data_path_for, run_main

# Written last into a finished tree: a folder without it is not a (complete) synthetic dataset.
MARKER_NAME = 'synthetic_dataset.json'

PART_NAMES = ('background', 'shadow', 'skin', 'hair', 'eyes', 'upper', 'upper_pattern', 'belt',
              'lower', 'lower_pattern', 'shoes', 'bag', 'hat')
(BACKGROUND, SHADOW, SKIN, HAIR, EYES, UPPER, UPPER_PATTERN, BELT,
 LOWER, LOWER_PATTERN, SHOES, BAG, HAT) = range(len(PART_NAMES))

SUPERSAMPLING = 2       # people are drawn at twice the image size, then shrunk: smooth edges
SCENE_WIDTH = 1.5       # a camera's scene is wider than an image; each image shows a random window

# The scene each SYSU-MM01 camera looks at; cam3 and cam6 are the infrared ones.
SYSU_CAMERA_SCENES = {'cam1': 'indoor_panels', 'cam2': 'indoor_bricks', 'cam3': 'infrared_indoor',
                      'cam4': 'outdoor_trees', 'cam5': 'outdoor_building', 'cam6': 'infrared_outdoor'}
REGDB_CAMERA_SCENES = {'Visible': 'outdoor_building', 'Thermal': 'infrared_outdoor'}

HAIR_STYLES = ('short', 'long', 'bun', 'cap')
UPPER_PATTERNS = ('plain', 'horizontal_stripes', 'vertical_stripes', 'checks', 'logo', 'open_jacket',
                  'two_tone')
LOWER_STYLES = ('trousers', 'trousers', 'shorts', 'skirt')
LOWER_PATTERNS = ('plain', 'cuffs', 'knee_band', 'hip_band')
BAGS = ('none', 'none', 'backpack', 'shoulder_bag')
HAIR_COLOURS = ((25, 20, 18), (60, 40, 28), (110, 75, 45), (195, 165, 105), (150, 150, 150))
TROUSER_COLOURS = ((45, 65, 110), (30, 30, 35), (95, 95, 100), (175, 150, 110), (35, 45, 80), (110, 80, 60))
SHOE_COLOURS = ((235, 235, 230), (25, 25, 25), (90, 55, 35), (60, 60, 65))
SKIN_LIGHT, SKIN_DARK = np.array((250, 215, 185)), np.array((115, 75, 55))


# ----------------------------------------------------------------------------- identities

@dataclass
class PersonLook:
    """What stays the same across every image of one identity."""
    height: float          # head top to soles, as a fraction of the image height
    build: float           # width factor of shoulders, hips and limbs
    head_scale: float
    crotch: float          # crotch level, as a fraction of body height from the head top
    hair_style: str        # one of HAIR_STYLES
    short_sleeves: bool
    upper_pattern: str     # one of UPPER_PATTERNS
    stripe_period: float   # of body height
    lower_style: str       # one of LOWER_STYLES
    lower_pattern: str     # one of LOWER_PATTERNS
    belt: bool
    bag: str               # one of BAGS
    colours: np.ndarray    # (len(PART_NAMES), 3) visible RGB of each part
    heat: np.ndarray       # (len(PART_NAMES),) infrared intensity of each part, 0..255


def pick(rng, options):
    """One of `options`, uniformly."""
    return options[rng.integers(len(options))]


def random_colour(rng, saturation=(0.35, 0.95), value=(0.25, 0.95)):
    hue, sat, val = rng.uniform(), rng.uniform(*saturation), rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def clothing_colour(rng):
    """Mostly saturated colours, sometimes white, grey or black."""
    if rng.uniform() < 0.3:
        return np.clip(pick(rng, (25, 60, 120, 180, 235)) + rng.normal(0, 6, 3), 0, 255)
    return random_colour(rng)


def contrasting_colour(base, rng):
    """A clothing colour clearly different from `base` (for stripes, logos, bands)."""
    colour = clothing_colour(rng)
    return colour if np.abs(colour - base).sum() > 150 else 255 - base


def shifted_heat(base, rng):
    """A clearly warmer or cooler intensity than `base`: a pattern of another fabric."""
    return float(np.clip(base + pick(rng, (-1, 1)) * rng.uniform(30, 55), 70, 235))


def random_person(rng):
    """A new identity's PersonLook."""
    colours = np.zeros((len(PART_NAMES), 3))
    colours[SKIN] = SKIN_LIGHT + rng.uniform() * (SKIN_DARK - SKIN_LIGHT)
    colours[EYES] = (45, 30, 30)
    colours[HAIR] = pick(rng, HAIR_COLOURS) if rng.uniform() < 0.85 else random_colour(rng)
    colours[UPPER] = clothing_colour(rng)
    colours[UPPER_PATTERN] = contrasting_colour(colours[UPPER], rng)
    colours[LOWER] = pick(rng, TROUSER_COLOURS) if rng.uniform() < 0.6 else clothing_colour(rng)
    colours[LOWER_PATTERN] = contrasting_colour(colours[LOWER], rng)
    colours[BELT] = pick(rng, ((40, 25, 15), (20, 20, 20), (120, 80, 40)))
    colours[SHOES] = pick(rng, SHOE_COLOURS)
    colours[BAG] = clothing_colour(rng)
    colours[HAT] = clothing_colour(rng)

    # Thermal look: skin is the warmest, clothing as warm as its fabric lets through, hair,
    # belt, shoes and bags cooler; identities differ by their fabrics.
    heat = np.zeros(len(PART_NAMES))
    heat[SKIN] = rng.uniform(215, 240)
    heat[EYES] = heat[SKIN] - 25
    heat[HAIR] = rng.uniform(105, 150)
    heat[UPPER] = rng.uniform(130, 210)
    heat[UPPER_PATTERN] = shifted_heat(heat[UPPER], rng)
    heat[LOWER] = rng.uniform(110, 190)
    heat[LOWER_PATTERN] = shifted_heat(heat[LOWER], rng)
    heat[BELT] = rng.uniform(80, 110)
    heat[SHOES] = rng.uniform(60, 95)
    heat[BAG] = rng.uniform(55, 95)
    heat[HAT] = rng.uniform(85, 125)

    return PersonLook(
        height=rng.uniform(0.78, 0.9), build=rng.uniform(0.85, 1.2), head_scale=rng.uniform(0.9, 1.1),
        crotch=rng.uniform(0.56, 0.6), hair_style=pick(rng, HAIR_STYLES), short_sleeves=rng.uniform() < 0.35,
        upper_pattern=pick(rng, UPPER_PATTERNS), stripe_period=rng.uniform(0.04, 0.08),
        lower_style=pick(rng, LOWER_STYLES), lower_pattern=pick(rng, LOWER_PATTERNS),
        belt=rng.uniform() < 0.7, bag=pick(rng, BAGS), colours=colours, heat=heat)


# ----------------------------------------------------------------------------- one image

@dataclass
class Pose:
    """What changes from one image of a person to the next."""
    shift_x: float         # of the image width
    shift_y: float         # of the image height
    scale: float
    stride: float          # how far the feet are apart, of body height
    arm_swing: tuple       # (left, right) hand offsets outwards, of body height
    front: bool            # facing the camera (face visible) or walking away (back of the head)
    mirror: bool
    light: float           # brightness factor of this image
    window: float          # 0..1: where the image lies in the camera's wider scene


def random_pose(rng):
    return Pose(shift_x=rng.uniform(-0.06, 0.06), shift_y=rng.uniform(-0.012, 0.008),
                scale=rng.uniform(0.94, 1.04), stride=rng.uniform(0.0, 0.07),
                arm_swing=(rng.uniform(-0.02, 0.04), rng.uniform(-0.02, 0.04)), front=rng.uniform() < 0.7,
                mirror=rng.uniform() < 0.5, light=rng.uniform(0.9, 1.1), window=rng.uniform())


@dataclass
class Body:
    """Where one drawn person stands and how big the body parts are, in canvas pixels."""
    centre_x: float
    top: float             # head top
    feet_y: float          # soles
    unit: float            # body height: every length below is a fraction of it
    shoulder_half: float   # half widths
    waist_half: float
    hip_half: float
    head_height: float
    head_half: float
    shoulder_y: float      # levels
    waist_y: float
    crotch_y: float
    ankle_y: float

    def level(self, fraction):
        """The row `fraction` of the body height below the head top."""
        return self.top + fraction * self.unit


def place_body(look, pose, canvas_size):
    width, height = canvas_size
    feet_y = height * (0.965 + pose.shift_y)
    unit = height * look.height * pose.scale
    top = feet_y - unit
    head_height = 0.13 * unit * look.head_scale
    return Body(centre_x=width * (0.5 + pose.shift_x), top=top, feet_y=feet_y, unit=unit,
                shoulder_half=0.115 * unit * look.build, waist_half=0.085 * unit * look.build,
                hip_half=0.092 * unit * look.build, head_height=head_height, head_half=0.37 * head_height,
                shoulder_y=top + 0.175 * unit, waist_y=top + 0.49 * unit, crotch_y=top + look.crotch * unit,
                ankle_y=top + 0.945 * unit)


def sorted_box(x0, y0, x1, y1):
    """A box whose corners come in either order, as PIL wants it (left, top, right, bottom)."""
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def draw_legs(draw, look, pose, body):
    """Shadow on the ground, legs (trousers, or skin under shorts and skirts), shoes, hips, skirt."""
    cx, unit, build = body.centre_x, body.unit, look.build
    draw.ellipse([cx - 1.4 * body.shoulder_half, body.feet_y - 0.02 * unit,
                  cx + 1.4 * body.shoulder_half, body.feet_y + 0.02 * unit], fill=SHADOW)
    # Legs run from just above the crotch (to overlap the hips) to the ankles.
    leg_top_y, leg_top_half, ankle_half = body.crotch_y - 0.03 * unit, 0.05 * unit * build, 0.028 * unit * build
    for side in (-1, 1):
        top_x = cx + side * body.hip_half * 0.5
        ankle_x = cx + side * (0.045 * unit * build + pose.stride * unit / 2)

        def leg_polygon(start, end):
            """Quadrilateral of the leg between fractions start..end of its length (0 top, 1 ankle)."""
            corners = []
            for t, sign in ((start, -1), (start, 1), (end, 1), (end, -1)):
                x = top_x + t * (ankle_x - top_x)
                half = leg_top_half + t * (ankle_half - leg_top_half)
                corners.append((x + sign * half, leg_top_y + t * (body.ankle_y - leg_top_y)))
            return corners

        draw.polygon(leg_polygon(0, 1), fill=LOWER if look.lower_style == 'trousers' else SKIN)
        if look.lower_style == 'shorts':
            draw.polygon(leg_polygon(0, 0.4), fill=LOWER)
        shoe_x = ankle_x + side * 0.012 * unit
        draw.ellipse([shoe_x - 0.048 * unit, body.feet_y - 0.05 * unit, shoe_x + 0.048 * unit, body.feet_y], fill=SHOES)

    draw.polygon([(cx - body.waist_half, body.waist_y), (cx + body.waist_half, body.waist_y),
                  (cx + body.hip_half, body.crotch_y), (cx - body.hip_half, body.crotch_y)], fill=LOWER)
    if look.lower_style == 'skirt':
        hem_y = body.level(0.74)
        draw.polygon([(cx - body.waist_half, body.waist_y), (cx + body.waist_half, body.waist_y),
                      (cx + 1.6 * body.hip_half, hem_y), (cx - 1.6 * body.hip_half, hem_y)], fill=LOWER)


def draw_torso(draw, look, pose, body):
    """Arms (sleeves, skin below short ones), torso, belt and hands."""
    cx, unit = body.centre_x, body.unit
    # The arms hang beside the torso, drawn first so that the torso covers their inner edge.
    arm_width = max(2, round(0.055 * unit * look.build))
    hands = []
    for side, swing in zip((-1, 1), pose.arm_swing):
        shoulder = (cx + side * (body.shoulder_half - 0.03 * unit), body.shoulder_y + 0.03 * unit)
        elbow = (cx + side * (body.shoulder_half + 0.01 * unit + swing * unit / 2), body.level(0.34))
        hand = (cx + side * (body.shoulder_half + swing * unit), body.level(0.52))
        draw.line([shoulder, elbow, hand], fill=SKIN if look.short_sleeves else UPPER, width=arm_width,
                  joint='curve')
        if look.short_sleeves:
            sleeve_end = ((shoulder[0] + elbow[0]) / 2, (shoulder[1] + elbow[1]) / 2)
            draw.line([shoulder, sleeve_end], fill=UPPER, width=arm_width + 2)
        hands.append(hand)

    shoulder_y, hem_y, hem_half = body.shoulder_y, body.waist_y + 0.01 * unit, 1.05 * body.waist_half
    draw.polygon([(cx - body.shoulder_half, shoulder_y + 0.035 * unit), (cx - 0.7 * body.shoulder_half, shoulder_y),
                  (cx + 0.7 * body.shoulder_half, shoulder_y), (cx + body.shoulder_half, shoulder_y + 0.035 * unit),
                  (cx + hem_half, hem_y), (cx - hem_half, hem_y)], fill=UPPER)
    if look.belt:
        draw.rectangle([cx - hem_half, body.waist_y - 0.006 * unit, cx + hem_half, body.waist_y + 0.018 * unit],
                       fill=BELT)
    for hand_x, hand_y in hands:
        draw.ellipse([hand_x - 0.027 * unit, hand_y - 0.03 * unit, hand_x + 0.027 * unit, hand_y + 0.03 * unit],
                     fill=SKIN)


def draw_bag(draw, look, pose, body):
    """Backpack (straps from the front, the pack from the back) or shoulder bag."""
    cx, unit = body.centre_x, body.unit
    if look.bag == 'backpack':
        if pose.front:
            for side in (-1, 1):
                draw.line([(cx + side * 0.55 * body.shoulder_half, body.shoulder_y),
                           (cx + side * 0.5 * body.shoulder_half, body.level(0.38))],
                          fill=BAG, width=max(1, round(0.028 * unit)))
        else:
            draw.rounded_rectangle([cx - 0.75 * body.shoulder_half, body.level(0.2),
                                    cx + 0.75 * body.shoulder_half, body.level(0.43)], radius=0.03 * unit, fill=BAG)
    elif look.bag == 'shoulder_bag':
        draw.line([(cx - 0.6 * body.shoulder_half, body.shoulder_y),
                   (cx + body.waist_half + 0.02 * unit, body.level(0.47))],
                  fill=BAG, width=max(1, round(0.018 * unit)))
        draw.rectangle([cx + body.waist_half, body.level(0.45), cx + body.waist_half + 0.1 * unit, body.level(0.58)],
                       fill=BAG)


def draw_head(draw, look, pose, body):
    """Neck, long hair, head (face from the front, hair from the back), crown of hair or cap, eyes, mouth."""
    cx, unit, top, head_height, head_half = body.centre_x, body.unit, body.top, body.head_height, body.head_half
    draw.rectangle([cx - 0.032 * unit, body.level(0.11), cx + 0.032 * unit, body.shoulder_y + 0.01 * unit], fill=SKIN)
    if pose.front:   # neckline
        draw.ellipse([cx - 0.04 * unit, body.shoulder_y - 0.01 * unit,
                      cx + 0.04 * unit, body.shoulder_y + 0.045 * unit], fill=SKIN)
    if look.hair_style == 'long':
        hair_top, hair_bottom = top + 0.4 * head_height, body.level(0.26)
        if pose.front:
            for side in (-1, 1):
                draw.rectangle(sorted_box(cx + side * 1.2 * head_half, hair_top, cx + side * 0.6 * head_half,
                                          hair_bottom), fill=HAIR)
        else:
            draw.rectangle([cx - 1.15 * head_half, hair_top, cx + 1.15 * head_half, hair_bottom], fill=HAIR)
    draw.ellipse([cx - head_half, top, cx + head_half, top + head_height], fill=SKIN if pose.front else HAIR)
    crown_box = [cx - 1.08 * head_half, top - 0.012 * unit, cx + 1.08 * head_half, top + 0.85 * head_height]
    if look.hair_style == 'cap':
        draw.chord(crown_box, 180, 360, fill=HAT)
        brim_y = top + 0.4 * head_height
        draw.rectangle([cx - 1.25 * head_half, brim_y - 0.04 * head_height,
                        cx + 1.3 * head_half, brim_y + 0.04 * head_height], fill=HAT)
    else:
        draw.chord(crown_box, 180, 360, fill=HAIR)
        if look.hair_style == 'bun':
            draw.ellipse([cx - 0.4 * head_half, top - 0.05 * unit, cx + 0.4 * head_half, top + 0.02 * unit], fill=HAIR)
    if pose.front:
        eye_y, eye_radius = top + 0.55 * head_height, 0.06 * head_height
        for side in (-1, 1):
            eye_x = cx + side * 0.38 * head_half
            draw.ellipse([eye_x - eye_radius, eye_y - eye_radius, eye_x + eye_radius, eye_y + eye_radius], fill=EYES)
        mouth_y = top + 0.8 * head_height
        draw.line([(cx - 0.25 * head_half, mouth_y), (cx + 0.25 * head_half, mouth_y)], fill=EYES,
                  width=max(1, round(0.03 * head_height)))


def add_patterns(parts, look, body):
    """Turn the clothing pixels inside the identity's pattern into the pattern parts, in place."""
    rows, columns = np.ogrid[:parts.shape[0], :parts.shape[1]]
    cx, unit, level = body.centre_x, body.unit, body.level
    half_period = look.stripe_period * unit / 2
    horizontal = ((rows - body.shoulder_y) // half_period) % 2 == 1
    vertical = ((columns - cx) // half_period) % 2 == 1
    upper_regions = {
        'plain': None, 'horizontal_stripes': horizontal, 'vertical_stripes': vertical,
        'checks': horizontal ^ vertical,
        'logo': (np.abs(rows - level(0.29)) < 0.045 * unit) & (np.abs(columns - cx) < 0.05 * unit),
        'open_jacket': np.abs(columns - cx) < 0.04 * unit,
        'two_tone': rows > level(0.34),
    }
    lower_regions = {
        'plain': None, 'cuffs': rows > level(0.88), 'knee_band': np.abs(rows - level(0.73)) < 0.025 * unit,
        'hip_band': (rows > level(0.52)) & (rows < level(0.56)),
    }
    for part, pattern_part, region in ((UPPER, UPPER_PATTERN, upper_regions[look.upper_pattern]),
                                       (LOWER, LOWER_PATTERN, lower_regions[look.lower_pattern])):
        if region is not None:
            parts[(parts == part) & region] = pattern_part


def draw_parts(look, pose, canvas_size):
    """Map of body parts of one person on a canvas of canvas_size=(W, H), drawn back to front.

    Returns (parts: (H, W) uint8 of the part constants, Body).
    """
    body = place_body(look, pose, canvas_size)
    canvas = Image.new('L', canvas_size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for draw_step in (draw_legs, draw_torso, draw_bag, draw_head):
        draw_step(draw, look, pose, body)
    parts = np.array(canvas)
    add_patterns(parts, look, body)
    return parts, body


def lookup_table(values):
    """A 256-entry table for Image.point: entry k is values[k] (0 beyond), rounded into 0..255."""
    table = np.zeros(256)
    table[:len(values)] = values
    return np.clip(np.round(table), 0, 255).astype(int).tolist()


def render_person(look, camera, rng, size):
    """One image of identity `look` seen by `camera`, pose and noise drawn from `rng`: a PIL RGB
    image of size=(width, height); infrared images are grey in all three channels."""
    pose = random_pose(rng)
    canvas_size = (size[0] * SUPERSAMPLING, size[1] * SUPERSAMPLING)
    parts, body = draw_parts(look, pose, canvas_size)
    part_map = Image.fromarray(parts)
    person_mask = part_map.point(lookup_table([255 if part >= SKIN else 0 for part in range(len(PART_NAMES))]))
    shadow_mask = part_map.point(lookup_table([255 if part == SHADOW else 0 for part in range(len(PART_NAMES))]))
    window_x = int(pose.window * (camera.scene.width - canvas_size[0]))
    scene = camera.scene.crop((window_x, 0, window_x + canvas_size[0], canvas_size[1]))

    # Round-body shading: darker (cooler) towards the sides and, a little, towards the feet.
    rows, columns = np.ogrid[:canvas_size[1], :canvas_size[0]]
    across = np.clip(((columns - body.centre_x) / (1.6 * body.shoulder_half)) ** 2, 0, 1)
    down = np.clip((rows - body.top) / body.unit, 0, 1)
    if camera.infrared:
        shading = Image.fromarray(np.round(255 * (1 - 0.2 * across) * (1 - 0.12 * down)).astype(np.uint8))
        person = ImageChops.multiply(part_map.point(lookup_table(look.heat)), shading)
        warmed = scene.point(lookup_table(np.arange(256) + 12))      # feet warm the ground they stand on
        scene = Image.composite(warmed, scene, shadow_mask)
        light = [camera.gain * pose.light]
    else:
        shading = Image.fromarray(np.round(255 * (1 - 0.3 * across) * (1 - 0.1 * down)).astype(np.uint8))
        person = Image.merge('RGB', [part_map.point(lookup_table(look.colours[:, channel])) for channel in range(3)])
        person = ImageChops.multiply(person, Image.merge('RGB', [shading] * 3))
        scene = Image.composite(scene.point(lookup_table(np.arange(256) * 0.55) * 3), scene, shadow_mask)
        light = camera.cast * camera.brightness * pose.light
    image = Image.composite(person, scene, person_mask)
    image = image.point([entry for gain in light for entry in lookup_table(np.arange(256) * gain)])
    image = image.resize(size, Image.Resampling.BOX)
    if camera.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    if pose.mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + camera.noise * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image.convert('RGB')


# ----------------------------------------------------------------------------- cameras

@dataclass
class CameraLook:
    """What every image of one camera shares."""
    infrared: bool
    scene: Image.Image     # 'L' (infrared) or 'RGB', SCENE_WIDTH times as wide as a canvas, as high
    brightness: float      # visible light level
    cast: np.ndarray       # (3,) visible colour cast
    gain: float            # infrared gain
    blur: float            # Gaussian blur radius at image size
    noise: float           # standard deviation of the pixel noise


def make_camera(scene_kind, rng, size):
    """A camera looking at a scene of `scene_kind` (see draw_scene), for images of size=(W, H)."""
    canvas_width, canvas_height = size[0] * SUPERSAMPLING, size[1] * SUPERSAMPLING
    scene = draw_scene(scene_kind, rng, (int(canvas_width * SCENE_WIDTH), canvas_height))
    resolution = size[1] / 256          # blur radii are chosen for 256-pixel-high images
    if scene_kind.startswith('infrared'):
        return CameraLook(infrared=True, scene=scene, brightness=1.0, cast=np.ones(3), gain=rng.uniform(0.9, 1.1),
                          blur=rng.uniform(0.8, 1.4) * resolution, noise=rng.uniform(3, 6))
    return CameraLook(infrared=False, scene=scene, brightness=rng.uniform(0.75, 1.2),
                      cast=1 + rng.uniform(-0.12, 0.12, 3), gain=1.0, blur=rng.uniform(0, 0.5) * resolution,
                      noise=rng.uniform(2, 5))


def fill_rows(draw, width, y0, y1, colour_at):
    """Paint rows y0..y1 with colour_at(t), t running from 0 at y0 to 1 at y1: a vertical gradient.
    colour_at gives an RGB triple or, on a grey image, one value."""
    y0, y1 = int(y0), int(y1)
    for row in range(y0, y1):
        colour = np.clip(colour_at((row - y0) / max(y1 - y0 - 1, 1)), 0, 255).astype(int)
        draw.line([(0, row), (width, row)], fill=tuple(colour.tolist()) if colour.ndim else int(colour))


def floor_lines(draw, width, height, floor_y, colour, rng):
    """Floor joints in perspective: rows closer together towards the horizon, lines converging."""
    for k in range(1, 9):
        row = floor_y + (height - floor_y) * (k / 8) ** 1.7
        draw.line([(0, row), (width, row)], fill=colour, width=2)
    vanishing_x = width * rng.uniform(0.3, 0.7)
    for x in np.linspace(-width, 2 * width, 13):
        draw.line([(vanishing_x + (x - vanishing_x) * 0.25, floor_y), (x, height)], fill=colour, width=2)


def draw_scene(kind, rng, size):
    """Background of one camera: a PIL image of size=(W, H), grey ('L') for infrared kinds, else RGB.

    Every scene changes from top to bottom (ceiling, wall or sky, then floor or ground in perspective).
    """
    width, height = size
    infrared = kind.startswith('infrared')
    image = Image.new('L' if infrared else 'RGB', size)
    draw = ImageDraw.Draw(image)
    floor_y = height * rng.uniform(0.62, 0.72)

    def shade(colour, factor):
        return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)

    if kind == 'indoor_panels':
        wall = random_colour(rng, saturation=(0.05, 0.3), value=(0.55, 0.85))
        lower_wall = random_colour(rng, saturation=(0.1, 0.4), value=(0.35, 0.6))
        floor = random_colour(rng, saturation=(0.05, 0.3), value=(0.35, 0.7))
        fill_rows(draw, width, 0, floor_y, lambda t: wall * (1.1 - 0.2 * t))
        draw.rectangle([0, 0.45 * height, width, floor_y], fill=shade(lower_wall, 1))
        draw.rectangle([0, 0, width, 0.05 * height], fill=(240, 240, 228))
        draw.rectangle([0, 0.44 * height, width, 0.46 * height], fill=shade(wall, 0.6))
        for x in np.arange(rng.uniform(0, 40), width, width * rng.uniform(0.18, 0.3)):
            draw.line([(x, 0.05 * height), (x, 0.44 * height)], fill=shade(wall, 0.75), width=2)
        fill_rows(draw, width, floor_y, height, lambda t: floor * (0.85 + 0.3 * t))
        floor_lines(draw, width, height, floor_y, shade(floor, 0.7), rng)
    elif kind == 'indoor_bricks':
        brick = random_colour(rng, saturation=(0.3, 0.7), value=(0.45, 0.75))
        mortar = np.array((200, 195, 185)) * rng.uniform(0.8, 1.0)
        floor = random_colour(rng, saturation=(0.0, 0.2), value=(0.25, 0.5))
        draw.rectangle([0, 0, width, floor_y], fill=shade(mortar, 1))
        brick_height, brick_width = height * 0.035, width * rng.uniform(0.12, 0.2)
        for row, y in enumerate(np.arange(0, floor_y, brick_height)):
            offset = (row % 2) * brick_width / 2
            for x in np.arange(-offset, width, brick_width):
                colour = brick * rng.uniform(0.85, 1.15)
                draw.rectangle([x + 1, y + 1, x + brick_width - 2, min(y + brick_height - 2, floor_y)],
                               fill=shade(colour, 1 - 0.25 * y / floor_y))
        draw.rectangle([0, floor_y, width, floor_y + 0.03 * height], fill=shade(floor, 0.6))
        fill_rows(draw, width, floor_y + 0.03 * height, height, lambda t: floor * (0.9 + 0.3 * t))
    elif kind == 'outdoor_trees':
        sky = np.array((150, 190, 235)) * rng.uniform(0.85, 1.05)
        ground = random_colour(rng, saturation=(0.05, 0.25), value=(0.45, 0.7))
        fill_rows(draw, width, 0, 0.4 * height, lambda t: sky * (1 - 0.15 * t) + 40 * t)
        draw.rectangle([0, 0.4 * height, width, floor_y], fill=(70, 120, 60))
        for _ in range(30):
            x, y, radius = rng.uniform(0, width), rng.uniform(0.08, 0.5) * height, rng.uniform(0.04, 0.1) * height
            green = np.array((40, 90, 40)) * rng.uniform(0.7, 1.3)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=shade(green, 1))
        fill_rows(draw, width, floor_y, height, lambda t: ground * (0.8 + 0.35 * t))
        draw.rectangle([0, floor_y, width, floor_y + 0.015 * height], fill=(200, 200, 195))
        floor_lines(draw, width, height, floor_y, shade(ground, 0.75), rng)
    elif kind == 'outdoor_building':
        facade = random_colour(rng, saturation=(0.1, 0.45), value=(0.5, 0.85))
        pavement = random_colour(rng, saturation=(0.0, 0.15), value=(0.5, 0.75))
        fill_rows(draw, width, 0, floor_y, lambda t: facade * (1.05 - 0.2 * t))
        window = np.array((60, 75, 95)) * rng.uniform(0.8, 1.2)
        window_width, window_height = width * 0.12, height * 0.09
        for y in np.arange(0.03 * height, 0.5 * height, window_height * 1.7):
            for x in np.arange(rng.uniform(0, window_width), width, window_width * 1.8):
                draw.rectangle([x, y, x + window_width, y + window_height], fill=shade(window, 1))
        draw.rectangle([0, floor_y - 0.02 * height, width, floor_y], fill=shade(facade, 0.5))
        fill_rows(draw, width, floor_y, height, lambda t: pavement * (0.85 + 0.3 * t))
        floor_lines(draw, width, height, floor_y, shade(pavement, 0.7), rng)
    elif kind == 'infrared_indoor':
        wall, floor = rng.uniform(25, 45), rng.uniform(40, 60)
        fill_rows(draw, width, 0, floor_y, lambda t: wall * (1.15 - 0.25 * t))
        for x in np.arange(rng.uniform(0, 60), width, width * 0.4):
            draw.ellipse([x, -0.02 * height, x + 0.15 * width, 0.03 * height], fill=int(rng.uniform(160, 210)))
        radiator = int(rng.uniform(70, 95))
        for x in np.arange(rng.uniform(0, 40), width, width * 0.5):
            draw.rectangle([x, 0.45 * height, x + 0.25 * width, 0.57 * height], fill=radiator)
            for fin in np.arange(x, x + 0.25 * width, 6):
                draw.line([(fin, 0.45 * height), (fin, 0.57 * height)], fill=radiator - 25, width=1)
        fill_rows(draw, width, floor_y, height, lambda t: floor * (0.85 + 0.35 * t))
        floor_lines(draw, width, height, floor_y, int(floor * 0.8), rng)
    elif kind == 'infrared_outdoor':
        sky, ground = rng.uniform(8, 20), rng.uniform(50, 75)
        fill_rows(draw, width, 0, 0.4 * height, lambda t: sky + 20 * t)
        draw.rectangle([0, 0.4 * height, width, floor_y], fill=int(sky + 25))
        for _ in range(25):
            x, y, radius = rng.uniform(0, width), rng.uniform(0.15, 0.55) * height, rng.uniform(0.04, 0.1) * height
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=int(rng.uniform(30, 55)))
        fill_rows(draw, width, floor_y, height, lambda t: ground * (0.75 + 0.35 * t))
        draw.rectangle([0, floor_y, width, floor_y + 0.015 * height], fill=int(ground * 1.2))
    else:
        raise ValueError(f'unknown scene kind {kind!r}')

    grain = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, (height, width) + (() if infrared else (3,)))
    return Image.fromarray(np.clip(np.round(grain), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- dataset trees

def require_absent_or_empty(root):
    """A synthetic tree is only ever written where nothing is yet."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f'{root} already exists and is not an empty folder (nor a finished synthetic dataset): '
                        f'remove it or choose another folder (--data_path) for the synthetic dataset.')


def build_tree_atomically(root, write_tree, description):
    """Write a dataset with write_tree(folder) into a hidden sibling of `root`, add the marker
    file (holding `description`), then rename the folder to `root`: an interrupted run leaves
    nothing at `root`. `root` must be absent or an empty folder."""
    root = Path(root)
    require_absent_or_empty(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root.parent, prefix=f'.{root.name}.partial-'))
    try:
        write_tree(building)
        (building / MARKER_NAME).write_text(json.dumps(description, indent=2) + '\n')
        os.chmod(building, 0o755)   # mkdtemp makes it private
        try:
            if root.exists():
                root.rmdir()
            os.rename(building, root)
        except OSError:
            if not (root / MARKER_NAME).is_file():
                raise
            shutil.rmtree(building)   # another process finished the same tree first
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return root


def cameras_seen(rng):
    """SYSU-MM01 cameras that saw a training identity: as in the real set, not every identity
    passes every camera; at least one visible and one infrared camera always remain."""
    visible = [camera for camera in VISIBLE_CAMERAS if rng.uniform() > 0.2] or [pick(rng, VISIBLE_CAMERAS)]
    infrared = list(INFRARED_CAMERAS)
    if rng.uniform() < 0.15:
        infrared.remove(pick(rng, INFRARED_CAMERAS))
    return sorted(visible + infrared, key=lambda camera: int(camera[len('cam'):]))


def make_synthetic_sysu(root, seed=0, num_train_ids=32, num_val_ids=8, num_test_ids=12, images_per_camera=6,
                        gallery_images_per_camera=10, size=(128, 256)):
    """Write a SYSU-MM01-layout tree at `root` (absent or empty): camK/NNNN/NNNN.jpg and
    exp/{train,val,test}_id.txt. Identities 1..total are shuffled into the three splits.
    Test identities' visible cameras hold gallery_images_per_camera images (multi-shot draws ten),
    every other folder images_per_camera; a few camera folders of training identities are left
    out. size=(width, height). Returns root as a Path."""
    num_ids = num_train_ids + num_val_ids + num_test_ids
    if num_ids > 9999:
        raise UserError(f'A SYSU-MM01 tree holds at most 9999 identities, {num_ids} were asked for.')
    shuffled = [int(pid) for pid in np.random.default_rng([seed, 0]).permutation(np.arange(1, num_ids + 1))]
    splits = {'train': sorted(shuffled[:num_train_ids]),
              'val': sorted(shuffled[num_train_ids:num_train_ids + num_val_ids]),
              'test': sorted(shuffled[num_train_ids + num_val_ids:])}
    cameras = {name: make_camera(scene, np.random.default_rng([seed, 1, int(name[len('cam'):])]), size)
               for name, scene in SYSU_CAMERA_SCENES.items()}

    def write_tree(folder):
        (folder / 'exp').mkdir()
        for split, ids in splits.items():
            (folder / 'exp' / f'{split}_id.txt').write_text(','.join(str(pid) for pid in ids) + '\n')
        for split, ids in splits.items():
            for pid in ids:
                look = random_person(np.random.default_rng([seed, 2, pid]))
                seen = cameras_seen(np.random.default_rng([seed, 4, pid])) if split == 'train' else sorted(cameras)
                for camera_name in seen:
                    gallery = split == 'test' and camera_name in VISIBLE_CAMERAS
                    image_folder = folder / camera_name / f'{pid:04d}'
                    image_folder.mkdir(parents=True)
                    for index in range(gallery_images_per_camera if gallery else images_per_camera):
                        rng = np.random.default_rng([seed, 3, pid, int(camera_name[len('cam'):]), index])
                        image = render_person(look, cameras[camera_name], rng, size)
                        image.save(image_folder / f'{index + 1:04d}.jpg', quality=90)

    description = {'layout': 'SYSU-MM01', 'seed': seed, 'num_train_ids': num_train_ids, 'num_val_ids': num_val_ids,
                   'num_test_ids': num_test_ids, 'images_per_camera': images_per_camera,
                   'gallery_images_per_camera': gallery_images_per_camera, 'size': list(size)}
    return build_tree_atomically(root, write_tree, description)


def make_synthetic_regdb(root, seed=0, num_ids=20, images_per_modality=10, size=(64, 128)):
    """Write a RegDB-layout tree at `root` (absent or empty): Visible/<id>/v_<id>_<k>.bmp,
    Thermal/<id>/t_<id>_<k>.bmp and idx/{train,test}_{visible,thermal}_{1..10}.txt. Each trial
    splits the identities half/half at random (seeded); labels are 0..n-1 in ascending identity
    order within each half. size=(width, height). Returns root as a Path."""
    cameras = {modality: make_camera(scene, np.random.default_rng([seed, 11, index]), size)
               for index, (modality, scene) in enumerate(REGDB_CAMERA_SCENES.items())}
    ids = list(range(1, num_ids + 1))

    def write_tree(folder):
        images_of = {modality: {} for modality in cameras}
        for pid in ids:
            look = random_person(np.random.default_rng([seed, 12, pid]))
            for modality_index, (modality, camera) in enumerate(cameras.items()):
                (folder / modality / str(pid)).mkdir(parents=True)
                images_of[modality][pid] = []
                for index in range(images_per_modality):
                    relative_path = f'{modality}/{pid}/{modality[0].lower()}_{pid:04d}_{index + 1:02d}.bmp'
                    rng = np.random.default_rng([seed, 13, pid, modality_index, index])
                    render_person(look, camera, rng, size).save(folder / relative_path)
                    images_of[modality][pid].append(relative_path)
        (folder / 'idx').mkdir()
        for trial in range(1, 11):
            order = [int(pid) for pid in np.random.default_rng([seed, 14, trial]).permutation(ids)]
            halves = {'train': sorted(order[:num_ids // 2]), 'test': sorted(order[num_ids // 2:])}
            for split, split_ids in halves.items():
                for modality in cameras:
                    lines = [f'{path} {label}' for label, pid in enumerate(split_ids)
                             for path in images_of[modality][pid]]
                    (folder / 'idx' / f'{split}_{modality.lower()}_{trial}.txt').write_text('\n'.join(lines) + '\n')

    description = {'layout': 'RegDB', 'seed': seed, 'num_ids': num_ids, 'images_per_modality': images_per_modality,
                   'size': list(size)}
    return build_tree_atomically(root, write_tree, description)


def ensure_synthetic_sysu(root, **options):
    """The synthetic SYSU-MM01 tree at `root`, generated (with make_synthetic_sysu's `options`, default
    the demo set) and pre-processed if not yet done. A tree already there is used as it is: its
    synthetic_dataset.json says how it was made."""
    root = Path(root)
    if not (root / MARKER_NAME).is_file():
        require_absent_or_empty(root)
        print(f'Generating a synthetic SYSU-MM01 look-alike at {root} (once) ...', flush=True)
        make_synthetic_sysu(root, **options)
    if not all((root / name).is_file() for name in TRAIN_ARRAY_NAMES):
        preprocess_sysu(root)
    return root


def save_contact_sheet(root, sheet_path, num_ids=8):
    """A PNG grid of a SYSU-MM01-layout tree: one row per training identity (the first num_ids),
    one column per camera cam1..cam6 (blank where that camera missed the identity)."""
    root = Path(root)
    camera_names = sorted(SYSU_CAMERA_SCENES)
    rows = []
    for pid in read_split_ids(root, 'train')[:num_ids]:
        row = []
        for camera_name in camera_names:
            folder = root / camera_name / f'{pid:04d}'
            row.append(sorted(folder.iterdir())[0] if folder.is_dir() else None)
        rows.append(row)
    with Image.open(next(path for row in rows for path in row if path)) as first:
        tile_width, tile_height = first.size
    sheet = Image.new('RGB', (tile_width * len(camera_names), tile_height * len(rows)), 'white')
    for row_index, row in enumerate(rows):
        for column_index, path in enumerate(row):
            if path is not None:
                with Image.open(path) as image:
                    sheet.paste(image.convert('RGB'), (column_index * tile_width, row_index * tile_height))
    sheet.save(sheet_path)


def main():
    parser = argparse.ArgumentParser(description='Generate the synthetic SYSU-MM01 look-alike (once).')
    parser.add_argument('--data_path', default=None,
                        help=f'where to write it (default: {data_path_for("synthetic")})')
    parser.add_argument('--sheet', default=None, help='also save a PNG contact sheet of samples here')
    parser.add_argument('--num_train_ids', default=32, type=int, help='training identities')
    parser.add_argument('--num_val_ids', default=8, type=int,
                        help='validation identities (trained on too, as in SYSU-MM01)')
    parser.add_argument('--num_test_ids', default=12, type=int,
                        help='test identities (chance Rank-1 is 1 / this; e.g. 100 for a set that ranks methods)')
    parser.add_argument('--seed', default=0, type=int)
    args = parser.parse_args()
    for flag in ('num_train_ids', 'num_val_ids', 'num_test_ids'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1 (SYSU-MM01 lists each split), got {getattr(args, flag)}.')
    options = dict(seed=args.seed, num_train_ids=args.num_train_ids, num_val_ids=args.num_val_ids,
                   num_test_ids=args.num_test_ids)
    root = data_path_for('synthetic', args.data_path)
    if (root / MARKER_NAME).is_file():
        made = json.loads((root / MARKER_NAME).read_text())
        if any(made.get(key) != value for key, value in options.items()):
            raise UserError(f'{root} already holds a synthetic set made with '
                            f'{", ".join(f"{key} {made.get(key)}" for key in options)}: choose another --data_path '
                            f'for one with {", ".join(f"{key} {value}" for key, value in options.items())}.')
    root = ensure_synthetic_sysu(root, **options)
    if args.sheet:
        save_contact_sheet(root, args.sheet)
        print(f'Contact sheet saved to {args.sheet}.')


if __name__ == '__main__':
    run_main(main)
