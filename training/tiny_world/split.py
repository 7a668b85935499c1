"""The combinations of the tiny world, the fixed train / held-out split of them, and the sampled specs."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .families import COMPOSITION, COMPOSITION_PARTS, FAMILIES, regular_attributes
from .shapes import ShapeSpec


def list_combinations() -> list[ShapeSpec]:
    """Every combination of the tiny world, as canonical (un-jittered) specs, in a fixed order."""
    specs = [
        ShapeSpec(name, attributes) for name, family in FAMILIES.items() for attributes in family.combinations()
    ]
    for relation, (firsts, seconds) in COMPOSITION_PARTS.items():
        for first, second in itertools.product(firsts, seconds):
            if first != second:
                parts = (ShapeSpec(first, regular_attributes(first)), ShapeSpec(second, regular_attributes(second)))
                specs.append(ShapeSpec(COMPOSITION, {"relation": relation}, parts))
    return specs



@dataclass(frozen=True)
class TinyWorldSplit:
    """The fixed split of combinations.

    Attributes:
        train: combinations that appear in training.
        novel: combinations held out entirely (only in the `test` split).
        novel_pairs: the held-out (family, attribute, value) triples that define the novel single shapes.
    """

    train: tuple[ShapeSpec, ...]
    novel: tuple[ShapeSpec, ...]
    novel_pairs: tuple[tuple[str, str, str], ...]


def split_combinations(seed: int = 0, num_novel_pairs: int = 4, num_novel_compositions: int = 3) -> TinyWorldSplit:
    """Choose the held-out combinations, deterministically from `seed`.

    Held out are all combinations with one of `num_novel_pairs` (family, attribute, non-default value) pairs, e.g.
    every flat cone, and `num_novel_compositions` compositions. The choice keeps the split compositional: a held-out
    value stays in training with at least two other families, a family loses at most one pair and keeps at least
    half of its combinations, and a held-out composition's parts still appear in the same slot of that relation.

    Returns:
        The `TinyWorldSplit`.
    """
    rng = np.random.default_rng(seed)
    combinations = list_combinations()
    singles = [spec for spec in combinations if spec.family != COMPOSITION]
    compositions = [spec for spec in combinations if spec.family == COMPOSITION]

    defaults = {"proportion": "regular", "orientation": "upright"}
    candidates = sorted(
        {
            (spec.family, name, value)
            for spec in singles
            for name, value in spec.attributes.items()
            if defaults.get(name) != value
        }
    )
    novel_pairs: list[tuple[str, str, str]] = []
    held: set[str] = set()
    for index in rng.permutation(len(candidates)):
        if len(novel_pairs) == num_novel_pairs:
            break
        family, name, value = candidates[index]
        if any(pair[0] == family for pair in novel_pairs):
            continue
        newly_held = {
            spec.combination for spec in singles if spec.family == family and spec.attributes.get(name) == value
        }
        family_total = sum(spec.family == family for spec in singles)
        family_held = sum(spec.family == family and spec.combination in held | newly_held for spec in singles)
        others_with_value = {
            spec.family
            for spec in singles
            if spec.family != family and spec.attributes.get(name) == value and spec.combination not in held
        }
        if family_held * 2 > family_total or len(others_with_value) < 2:
            continue
        novel_pairs.append((family, name, value))
        held |= newly_held

    chosen = 0
    for index in rng.permutation(len(compositions)):
        if chosen == num_novel_compositions:
            break
        spec = compositions[index]
        relation = spec.attributes["relation"]
        rest = [
            other
            for other in compositions
            if other.attributes["relation"] == relation and other.combination not in held | {spec.combination}
        ]
        if all(any(other.parts[slot].family == part.family for other in rest) for slot, part in enumerate(spec.parts)):
            held.add(spec.combination)
            chosen += 1

    return TinyWorldSplit(
        train=tuple(spec for spec in combinations if spec.combination not in held),
        novel=tuple(spec for spec in combinations if spec.combination in held),
        novel_pairs=tuple(novel_pairs),
    )


def _cycle(combinations: Sequence[ShapeSpec], num: int, rng: np.random.Generator) -> list[ShapeSpec]:
    """`num` combinations covering all of them as evenly as possible (each pass in a fresh random order)."""
    if num > 0 and not combinations:
        raise ValueError("Cannot sample from an empty list of combinations.")
    result: list[ShapeSpec] = []
    while len(result) < num:
        result.extend(combinations[i] for i in rng.permutation(len(combinations)))
    return result[:num]


def make_tiny_world_specs(
    num_train: int = 2000, num_heldout: int = 200, seed: int = 0, novel_fraction: float = 0.5
) -> dict[str, list[ShapeSpec]]:
    """Sample the specs of both splits.

    Args:
        num_train: number of training samples, spread evenly over the training combinations.
        num_heldout: number of held-out (`test`) samples.
        seed: fixes the split of combinations and every sample.
        novel_fraction: share of the held-out samples drawn from novel combinations; the rest are fresh samples
            of training combinations.

    Returns:
        `{"train": [...], "test": [...]}`, lists of jittered `ShapeSpec`s. Identical for identical arguments.
    """
    if num_train < 0 or num_heldout < 0:
        raise ValueError(f"Sample counts must be non-negative, got num_train={num_train}, num_heldout={num_heldout}.")
    if not 0.0 <= novel_fraction <= 1.0:
        raise ValueError(f"`novel_fraction` must be in [0, 1], got {novel_fraction}.")
    split = split_combinations(seed)
    rng = np.random.default_rng([seed, 1])
    num_novel = round(num_heldout * novel_fraction)
    train = [spec.sample(rng) for spec in _cycle(split.train, num_train, rng)]
    test = [spec.sample(rng) for spec in _cycle(split.novel, num_novel, rng)]
    test += [spec.sample(rng) for spec in _cycle(split.train, num_heldout - num_novel, rng)]
    return {"train": train, "test": test}
