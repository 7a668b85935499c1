"""The tiny world: procedural 3D shapes with captions, small enough to train a tiny CG-MLLM on a CPU.

No pretrained weights can be downloaded where this package is developed, so generation and captioning are shown
to work end to end on a world of simple shapes that a tiny model can learn in minutes. This module builds that
world as a real `datasets` dataset (a `meshfolder`: mesh files plus metadata), provides the train / held-out split,
and the ground-truth helpers that the evaluation uses.

What a shape is
---------------
A sample is a `ShapeSpec`: a *family* (sphere, box, cylinder, cone, pyramid, tube, torus, capsule, ellipsoid, or
a two-part *composition*), a few categorical *attributes*, and continuous *dims* jittered within the range of each
attribute, so that no two samples are identical. The categorical part alone (`ShapeSpec.combination`, e.g.
`"cone[orientation=lying,proportion=flat]"`) is what captions describe and what the split is made of.

Attributes, and why there is no "small" or "large"
---------------------------------------------------
The ShapeVAE pipeline centres every mesh on its bounding box and scales its longest side to the unit cube
(Hunyuan3D `normalize_mesh`), so absolute size is erased before the model ever sees a shape: "a small sphere" and
"a large sphere" would be the same latent with two captions, i.e. label noise. Every attribute here therefore
survives that normalisation:

* **proportion** (`regular` / `tall` / `flat`): height-to-width ratio along the shape's axis, in `[0.8, 1.25]`,
  `[2, 3]` and `[0.25, 0.45]` respectively, far enough apart for `classify_proportion` to tell them apart;
* **thickness** (`thin` / `thick`): tube radius of a torus, wall thickness of a tube;
* **orientation** (`upright` / `upside_down` / `lying` / `tilted`): direction of the shape's axis relative to the
  world up axis (`lying` puts it horizontal, `tilted` leans it 30-50 degrees sideways);
* **composition**: two parts, one `on_top_of` the other or one `left_of` the other.

Meshes are generated Y-up (glTF convention; the front faces +Z), centred on their bounding box, with the longest
side 1.8 (inside `[-0.9, 0.9]^3`). Every single shape is a watertight trimesh primitive; a composition is the
concatenation of two watertight parts (so it has two connected components, overlapping slightly when stacked).

Split
-----
The split is fixed by a seed. The held-out (`test`) split contains (1) *novel combinations*: a few
(family, attribute value) pairs such as "flat cone" and a few compositions such as "a cone on top of a box" whose
every combination is absent from `train`, while each attribute value and each part still occurs in `train` with
other families; and (2) fresh samples of combinations seen in training. The `novel_combination` column tells
them apart, so evaluation can report in-distribution and compositional generalisation separately.

On disk
-------
`build_tiny_world_dataset(output_dir)` writes::

    output_dir/
      README.md                 dataset card
      train/metadata.parquet    one row per sample (columns below), rendered PNG view embedded
      train/meshes/00000.ply    binary PLY, one per sample
      test/metadata.parquet
      test/meshes/00000.ply

which `datasets.load_dataset("meshfolder", data_dir=output_dir)` (or `load_tiny_world`) reads into the columns
`mesh` (decoded to `trimesh.Trimesh`), `image` (PIL, if rendered), `caption`, `captions`, `family`, `proportion`,
`thickness`, `orientation`, `relation`, `parts`, `combination`, `novel_combination`, `split` and `spec` (JSON for
`ShapeSpec.from_dict`, to rebuild the exact ground-truth mesh).

Modules
-------
One concern each: `families` (vocabulary), `captions`, `shapes` (`ShapeSpec` and its mesh), `split`, `classifiers`
(ground truth for evaluation), `dataset` (on disk, and the command line), `evaluation` (quality of a pipeline on
the held-out split, behind `benchmarks/eval_tiny_world.py`), `primitives` (trimesh's own primitives in any pose and
tessellation: held-out meshes the tiny world did not make) and `recipe` (one command from nothing to a trained
pipeline folder: `python -m cgmllm.training.tiny_world.recipe --out DIR`).
"""

from .captions import all_captions
from .classifiers import (
    canonical_chamfer,
    canonical_surface_points,
    classify_family,
    classify_orientation,
    classify_proportion,
    reference_meshes_for,
)
from .dataset import DATASET_VIEW, SPLITS, build_tiny_world_dataset, load_tiny_world, main
from .families import (
    ATTRIBUTE_NAMES,
    COMPOSITION,
    COMPOSITION_PARTS,
    FAMILIES,
    FAMILY_NAMES,
    MESH_EXTENT,
    ShapeFamily,
    regular_attributes,
)
from .shapes import ShapeSpec
from .split import TinyWorldSplit, list_combinations, make_tiny_world_specs, split_combinations


__all__ = [
    "ATTRIBUTE_NAMES",
    "COMPOSITION",
    "COMPOSITION_PARTS",
    "DATASET_VIEW",
    "FAMILIES",
    "FAMILY_NAMES",
    "MESH_EXTENT",
    "SPLITS",
    "ShapeFamily",
    "ShapeSpec",
    "TinyWorldSplit",
    "all_captions",
    "build_tiny_world_dataset",
    "canonical_chamfer",
    "canonical_surface_points",
    "classify_family",
    "classify_orientation",
    "classify_proportion",
    "list_combinations",
    "load_tiny_world",
    "main",
    "make_tiny_world_specs",
    "reference_meshes_for",
    "regular_attributes",
    "split_combinations",
]
