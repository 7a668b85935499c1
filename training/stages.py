"""Staged training schedule from one YAML config (paper §3: alignment, then progressive resolution).

    stages:
      - name: align                 # stage 1: 512 tokens, 90% condition dropout
        kind: alignment
        num_shape_tokens: 512
        condition_dropout: 0.9
        learning_rate: 1.0e-4
        max_steps: 1000
      - name: progressive           # stage 2: one sub-stage per resolution; dropout / lr interpolated linearly
        kind: progressive
        num_shape_tokens: [512, 1024, 2048, 4096]
        condition_dropout: [0.9, 0.1]
        learning_rate: [1.0e-4, 5.0e-5]
        max_steps: [500, 1000, 1000, 2000]   # per sub-stage (or one value for all)

Every stage starts from the weights the previous one ended with. Checks (each a `ValueError` naming the key or
stage): unknown keys, alignment after progressive, resolutions going down, dropout going up.
"""

from dataclasses import dataclass


STAGE_KINDS = ("alignment", "progressive")
STAGE_KEYS = {"name", "kind", "num_shape_tokens", "condition_dropout", "learning_rate", "max_steps",
              "num_train_epochs", "max_tokens", "task_weights", "per_device_train_batch_size",
              "gradient_accumulation_steps"}


@dataclass
class Stage:
    name: str
    kind: str
    num_shape_tokens: int
    condition_dropout: float
    learning_rate: float
    max_steps: int = -1
    num_train_epochs: float = 1.0
    max_tokens: int | None = None
    task_weights: dict | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None


def _interpolate(value, count: int, key: str, stage_name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) == count:
        return list(value)
    if len(value) == 2:
        start, end = float(value[0]), float(value[1])
        return [start + (end - start) * (i / max(count - 1, 1)) for i in range(count)]
    raise ValueError(
        f"Stage {stage_name!r}: {key!r} must be a single value, [start, end] or one value per resolution "
        f"({count}), got {value}."
    )


def expand_stages(stage_configs: list[dict]) -> list[Stage]:
    """Validate the `stages:` list and expand progressive stages into one `Stage` per resolution."""
    if not isinstance(stage_configs, list) or not stage_configs:
        raise ValueError("The config needs a non-empty `stages:` list.")
    stages: list[Stage] = []
    names = set()
    for index, raw in enumerate(stage_configs):
        if not isinstance(raw, dict):
            raise ValueError(f"Stage #{index} must be a mapping, got {raw!r}.")
        name = str(raw.get("name", f"stage{index}"))
        unknown = sorted(set(raw) - STAGE_KEYS)
        if unknown:
            raise ValueError(f"Stage {name!r}: unknown key(s) {unknown}; allowed: {sorted(STAGE_KEYS)}.")
        if name in names:
            raise ValueError(f"Stage name {name!r} is used twice.")
        names.add(name)
        kind = raw.get("kind", "alignment" if index == 0 else "progressive")
        if kind not in STAGE_KINDS:
            raise ValueError(f"Stage {name!r}: unknown kind {kind!r}; expected one of {STAGE_KINDS}.")
        for key in ("num_shape_tokens", "condition_dropout", "learning_rate"):
            if key not in raw:
                raise ValueError(f"Stage {name!r}: missing required key {key!r}.")
        tokens = raw["num_shape_tokens"]
        tokens = [int(t) for t in tokens] if isinstance(tokens, (list, tuple)) else [int(tokens)]
        if kind == "alignment" and len(tokens) != 1:
            raise ValueError(f"Stage {name!r}: an alignment stage has a single `num_shape_tokens`, got {tokens}.")
        dropouts = _interpolate(raw["condition_dropout"], len(tokens), "condition_dropout", name)
        rates = _interpolate(raw["learning_rate"], len(tokens), "learning_rate", name)
        # Step counts may also differ per resolution (higher N is harder: give it more steps).
        steps = [int(s) for s in _interpolate(raw.get("max_steps", -1), len(tokens), "max_steps", name)]
        extra = {key: raw[key] for key in STAGE_KEYS - {"name", "kind", "num_shape_tokens", "condition_dropout",
                                                         "learning_rate", "max_steps"} if key in raw}
        for i, (n, dropout, lr, max_steps) in enumerate(zip(tokens, dropouts, rates, steps)):
            sub_name = name if len(tokens) == 1 else f"{name}-{n}"
            stages.append(Stage(name=sub_name, kind=kind, num_shape_tokens=n, condition_dropout=float(dropout),
                                learning_rate=float(lr), max_steps=max_steps, **extra))
    _check_order(stages)
    return stages


def _check_order(stages: list[Stage]) -> None:
    seen_progressive = False
    for previous, stage in zip([None] + stages[:-1], stages):
        if stage.num_shape_tokens <= 0:
            raise ValueError(f"Stage {stage.name!r}: num_shape_tokens must be positive.")
        if not 0.0 <= stage.condition_dropout <= 1.0:
            raise ValueError(f"Stage {stage.name!r}: condition_dropout must be in [0, 1].")
        if stage.kind == "alignment" and seen_progressive:
            raise ValueError(f"Stage {stage.name!r}: an alignment stage cannot come after a progressive stage.")
        seen_progressive |= stage.kind == "progressive"
        if previous is None:
            continue
        if stage.num_shape_tokens < previous.num_shape_tokens:
            raise ValueError(
                f"Stage {stage.name!r}: num_shape_tokens {stage.num_shape_tokens} is below the previous stage "
                f"{previous.name!r} ({previous.num_shape_tokens}); resolution only grows."
            )
        if stage.condition_dropout > previous.condition_dropout + 1e-9:
            raise ValueError(
                f"Stage {stage.name!r}: condition_dropout {stage.condition_dropout} is above the previous stage "
                f"{previous.name!r} ({previous.condition_dropout}); dropout only decreases."
            )


__all__ = ["STAGE_KEYS", "STAGE_KINDS", "Stage", "expand_stages"]
