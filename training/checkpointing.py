"""Checkpoints that a kill at any moment cannot corrupt, finding the one to resume from, and strict loading.

Writing. Every checkpoint (and every stage's `final` folder) is written under a temporary name in the same folder,
`.incomplete-<name>`, and renamed to its real name only when every file is in it (EMA included). A rename within
one file system is atomic, so a `checkpoint-<step>` folder is always complete, and a kill mid-save leaves only an
`.incomplete-*` folder next to the previous, still usable, checkpoint.

Reading. `last_complete_checkpoint(folder)` returns the newest `checkpoint-<step>` holding `trainer_state.json`
(the last file the Trainer writes). Folders it passes over (a `checkpoint-<step>` without that file, written by an
older version or copied half-way, and `.incomplete-*` leftovers) are named in a warning.
"""

import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

STAGING_PREFIX = ".incomplete-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))


def staging_path(final_path) -> str:
    """Where `final_path` is written before it is renamed into place."""
    final_path = os.path.normpath(os.fspath(final_path))
    return os.path.join(os.path.dirname(final_path), STAGING_PREFIX + os.path.basename(final_path))


def publish(staged, final_path) -> None:
    """Rename the finished folder `staged` to `final_path`, replacing an older folder of that name."""
    final_path = os.fspath(final_path)
    if os.path.exists(final_path):
        # Same name again (e.g. a re-run stage's `final`): move the old one aside first, then drop it.
        old = staging_path(final_path) + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_path, old)
        os.rename(staged, final_path)
        shutil.rmtree(old)
    else:
        os.rename(staged, final_path)


def checkpoint_step(path) -> int | None:
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(os.fspath(path))))
    return int(match.group(1)) if match else None


def last_complete_checkpoint(folder) -> str | None:
    """The newest complete `checkpoint-<step>` in `folder` (None if there is none), warning about skipped ones."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    names = os.listdir(folder)
    leftovers = sorted(name for name in names if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR))
    if leftovers:
        logger.warning("%s: ignoring %s, checkpoint(s) whose save was interrupted.", folder, leftovers)
    checkpoints = sorted((checkpoint_step(name), name) for name in names
                         if checkpoint_step(name) is not None and os.path.isdir(os.path.join(folder, name)))
    skipped = []
    for _, name in reversed(checkpoints):
        path = os.path.join(folder, name)
        if is_complete_checkpoint(path):
            if skipped:
                logger.warning("%s: skipping incomplete checkpoint(s) %s (no %s: the save was interrupted); the "
                               "newest complete one is %s.", folder, skipped, TRAINER_STATE_NAME, name)
            return path
        skipped.append(name)
    if skipped:
        logger.warning("%s: no complete checkpoint; %s lack %s.", folder, skipped, TRAINER_STATE_NAME)
    return None


def check_resumable(path) -> str:
    """`path` itself if it is a complete checkpoint, else a `ValueError` naming what is wrong and what is usable."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"Cannot resume from {path}: no such folder.")
    if not is_complete_checkpoint(path):
        usable = last_complete_checkpoint(os.path.dirname(os.path.normpath(path)))
        raise ValueError(
            f"Cannot resume from {path}: it is not a complete checkpoint (no {TRAINER_STATE_NAME}; its save was "
            f"interrupted, or it is not a checkpoint folder). "
            + (f"The newest complete one next to it is {usable}." if usable else "There is no complete one next to it.")
        )
    return path




def from_pretrained_strict(cls, path, **kwargs):
    """`cls.from_pretrained(path, **kwargs)` for a transformers or diffusers model, raising a `ValueError` that names
    every missing, unexpected or mismatched weight. (Both libraries only log those by default: a missing weight then
    trains on randomly initialised, or stays on the meta device until the first forward fails.)"""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {name: sorted(map(str, info.get(f"{name}_keys") or ())) for name in ("missing", "unexpected",
                                                                                    "mismatched")}
    if any(problems.values()):
        listed = "; ".join(f"{len(keys)} {name}: {keys[:10]}{' ...' if len(keys) > 10 else ''}"
                           for name, keys in problems.items() if keys)
        raise ValueError(f"{path}: its weights do not match {cls.__name__} ({listed}). The folder is incomplete or "
                         "was saved from a different configuration.")
    return model


__all__ = ["STAGING_PREFIX", "check_resumable", "checkpoint_step", "from_pretrained_strict", "is_complete_checkpoint",
           "last_complete_checkpoint", "publish", "staging_path"]
