"""Keep the remote-code copies of a saved pipeline folder equal to the package.

A pipeline folder saved by `CGMLLMPipeline.save_pretrained` carries copies of the package's code (the modeling,
processing and pipeline files, and the `auto_map` / `model_index.json` entries that point at them), so that it
loads with `trust_remote_code=True` where `cgmllm` is not installed. A folder kept in the repository, like the
shipped `checkpoints/tiny-world`, goes stale as soon as a package file changes. This module re-saves such a folder's
pipeline and compares (or replaces) exactly what `save_pretrained` writes for remote code; the weights and the
rest of the configs are left untouched.

    cgmllm-build --refresh-remote-code checkpoints/tiny-world           # rewrite the code files from the package
    cgmllm-build --refresh-remote-code checkpoints/tiny-world --check   # only list the stale files (exit 1 if any)
"""

import json
import os
import tempfile
from pathlib import Path


# JSON files whose remote-code entries `save_pretrained` writes, and which of their keys are those entries
# (`None`: every key but the library version stamp).
_REMOTE_CODE_KEYS = {
    "model_index.json": None,
    "config.json": ("auto_map",),
    "processor_config.json": ("auto_map",),
    "tokenizer_config.json": ("auto_map",),
}
_VERSION_KEYS = ("_diffusers_version", "transformers_version")

REFRESH_COMMAND = "cgmllm-build --refresh-remote-code {folder}"
"""The command that fixes a stale folder; test failures name it."""


def _remote_code_entries(path: Path) -> dict:
    data = json.loads(path.read_text())
    keys = _REMOTE_CODE_KEYS[path.name]
    if keys is None:
        return {key: value for key, value in data.items() if key not in _VERSION_KEYS}
    return {key: data[key] for key in keys if key in data}


def _code_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*.py") if "__pycache__" not in path.parts}


def _metadata_files(folder: Path) -> set[str]:
    return {
        path.relative_to(folder).as_posix() for path in folder.rglob("*.json") if path.name in _REMOTE_CODE_KEYS
    }


def refresh_remote_code(pipeline_dir: str | os.PathLike, check: bool = False) -> list[str]:
    """Compare a saved pipeline folder's remote code with what the installed package writes, and fix it.

    The folder's pipeline is loaded with the installed classes and saved to a temporary folder; every `*.py` file
    and every remote-code JSON entry (`auto_map` of the component configs, the class entries of
    `model_index.json`) of the folder must equal that fresh save's.

    Args:
        pipeline_dir: a folder written by `CGMLLMPipeline.save_pretrained`.
        check: only report; change nothing.

    Returns:
        The stale paths, relative to `pipeline_dir` (`"x.py (not written by the package)"` for a code file the package
        no longer writes). Empty when the folder is up to date. Unless `check`, they have been rewritten (or
        removed) when this returns.
    """
    from ..pipelines import CGMLLMPipeline

    folder = Path(pipeline_dir)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a saved pipeline folder (no model_index.json).")
    pipe = CGMLLMPipeline.from_pretrained(folder)
    stale = []
    with tempfile.TemporaryDirectory() as temporary:
        fresh = Path(temporary)
        pipe.save_pretrained(fresh)
        for name in sorted(_code_files(fresh) | _code_files(folder)):
            if not (fresh / name).is_file():
                stale.append(f"{name} (not written by the package)")
                if not check:
                    (folder / name).unlink()
            elif not (folder / name).is_file() or (folder / name).read_bytes() != (fresh / name).read_bytes():
                stale.append(name)
                if not check:
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes((fresh / name).read_bytes())
        for name in sorted(_metadata_files(fresh)):
            expected = _remote_code_entries(fresh / name)
            if not (folder / name).is_file():
                continue  # not a remote-code file of this folder's layout
            if _remote_code_entries(folder / name) != expected:
                stale.append(name)
                if not check:
                    data = json.loads((folder / name).read_text())
                    data.update(expected)
                    for key in set(data) - set(expected) - set(_VERSION_KEYS):
                        if _REMOTE_CODE_KEYS[Path(name).name] is None or key in _REMOTE_CODE_KEYS[Path(name).name]:
                            del data[key]  # an entry the package no longer writes
                    (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return stale


__all__ = ["REFRESH_COMMAND", "refresh_remote_code"]
