"""Tests of the headless NumPy renderer (`cgmllm.rendering`)."""

import math

import numpy as np
import pytest
import trimesh
from PIL import Image

from conftest import real_mesh_path

from cgmllm.rendering import DEFAULT_COLOR, render_mesh, render_multiview, render_views


WHITE = (255, 255, 255)


def foreground(image: Image.Image, background=WHITE) -> np.ndarray:
    """`(H, W)` bool mask of pixels that differ from the background."""
    return (np.asarray(image) != np.asarray(background, dtype=np.uint8)).any(axis=-1)


def front_view(mesh, size=128, **kwargs):
    return render_mesh(mesh, size, elevation=0.0, azimuth=0.0, projection="orthographic", **kwargs)


@pytest.mark.parametrize("projection", ["orthographic", "perspective"])
def test_sphere_silhouette_is_a_centred_disc(projection):
    size, fill = 128, 0.9
    image = render_mesh(trimesh.creation.icosphere(subdivisions=4), size, projection=projection, fill=fill)
    mask = foreground(image)

    radius = fill * size / 2  # the bounding sphere is fitted to `fill` of the half image
    assert mask.mean() == pytest.approx(math.pi * radius**2 / size**2, rel=0.03)
    rows, cols = np.nonzero(mask)
    assert rows.mean() == pytest.approx(size / 2, abs=1.0)
    assert cols.mean() == pytest.approx(size / 2, abs=1.0)
    distance = np.hypot(rows + 0.5 - size / 2, cols + 0.5 - size / 2)
    assert distance.max() <= radius + 1.0  # no pixel outside the disc


def test_box_front_view_has_the_expected_rectangle():
    size, fill = 128, 0.9
    extents = np.array([1.0, 0.6, 0.4])
    mask = foreground(front_view(trimesh.creation.box(extents=extents), size, fill=fill))

    scale = fill * (size / 2) / (np.linalg.norm(extents) / 2)  # pixels per world unit
    expected_width, expected_height = extents[0] * scale, extents[1] * scale
    rows, cols = np.nonzero(mask)
    assert cols.max() - cols.min() + 1 == pytest.approx(expected_width, abs=1.5)
    assert rows.max() - rows.min() + 1 == pytest.approx(expected_height, abs=1.5)
    assert mask.sum() == pytest.approx(expected_width * expected_height, rel=0.03)


def test_shading_is_brighter_on_the_light_facing_side():
    # The key light comes from the upper left of the viewer.
    size = 128
    image = front_view(trimesh.creation.icosphere(subdivisions=4), size, color=(200, 200, 200))
    luminance = np.asarray(image.convert("L"), dtype=np.float64)
    mask = foreground(image)
    half = size // 2
    upper_left = luminance[:half, :half][mask[:half, :half]].mean()
    lower_right = luminance[half:, half:][mask[half:, half:]].mean()
    assert upper_left > lower_right + 40
    # Lambertian shading never exceeds the base colour and never falls below the ambient term.
    assert luminance[mask].max() <= 200 + 1
    assert luminance[mask].min() >= 0.3 * 200 - 1


def test_image_size_background_and_colour():
    background = (10, 20, 30)
    image = render_mesh(trimesh.creation.box(), 50, background=background, supersample=2)
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB" and image.size == (50, 50)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == background
    # Default colour: shaded pixels are a darkened DEFAULT_COLOR (same hue ordering).
    fg = pixels[foreground(image, background)]
    assert (fg[:, 2] >= fg[:, 0]).mean() > 0.9
    assert fg.max() <= max(DEFAULT_COLOR)


def test_face_colours_of_the_mesh_are_used():
    mesh = trimesh.creation.box()
    mesh.visual.face_colors = np.tile([255, 0, 0, 255], (len(mesh.faces), 1))
    pixels = np.asarray(front_view(mesh))[foreground(front_view(mesh))]
    assert (pixels[:, 0] > 0).all() and (pixels[:, 1:] == 0).all()


def test_open_surface_is_visible_from_both_sides():
    # A single square in the XY plane, facing +Z: seen from the back it must still be drawn (two-sided).
    quad = trimesh.Trimesh([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    front = foreground(render_mesh(quad, 64, elevation=0.0, azimuth=0.0, projection="orthographic"))
    back = foreground(render_mesh(quad, 64, elevation=0.0, azimuth=180.0, projection="orthographic"))
    assert front.mean() > 0.3 and back.mean() == pytest.approx(front.mean(), rel=0.02)


def test_multiview_grid_and_views():
    mesh = trimesh.creation.cylinder(radius=0.3, height=1.0)
    grid = render_multiview(mesh, 40, num_views=4, columns=2)
    assert grid.size == (80, 80)
    strip = render_multiview(mesh, 40, num_views=3)
    assert strip.size == (120, 40)
    views = render_views(mesh, [0, 90, 180], 32, elevation=30.0)
    assert [view.size for view in views] == [(32, 32)] * 3


def test_a_large_mesh_renders():
    mesh = trimesh.creation.icosphere(subdivisions=6)  # 81,920 faces
    assert foreground(render_mesh(mesh, 256)).mean() > 0.5


def test_invalid_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="empty mesh"):
        render_mesh(trimesh.Trimesh())
    with pytest.raises(ValueError, match="empty mesh"):
        render_mesh(trimesh.Scene())
    with pytest.raises(ValueError, match="empty mesh"):
        render_multiview(trimesh.Trimesh(vertices=np.zeros((3, 3))))
    box = trimesh.creation.box()
    with pytest.raises(ValueError, match="projection"):
        render_mesh(box, projection="fisheye")
    with pytest.raises(ValueError, match="image_size"):
        render_mesh(box, 0)
    with pytest.raises(ValueError, match="camera_distance"):
        render_mesh(box, projection="orthographic", camera_distance=2.0)
    with pytest.raises(ValueError, match="Trimesh"):
        render_mesh(np.zeros((3, 3)))


def test_real_airplane_renders():
    mesh = trimesh.load(real_mesh_path("airplane.ply"))
    image = render_mesh(mesh, 128, elevation=30.0)
    assert image.size == (128, 128)
    mask = foreground(image)
    assert 0.02 < mask.mean() < 0.9
    # Perspective framing with an explicit camera distance works too (TRELLIS-style protocol on a unit box).
    unit = mesh.copy()
    unit.apply_translation(-unit.bounds.mean(axis=0))
    unit.apply_scale(1.0 / unit.extents.max())
    assert foreground(render_mesh(unit, 64, camera_distance=2.0, fov=40.0)).any()
