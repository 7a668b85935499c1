"""The remote-code copies in saved pipeline folders stay equal to the package (`cgmllm.training.remote_code`):
the shipped `checkpoints/tiny-world` is checked, and the refresh command fixes a stale folder."""

import json
import shutil

import pytest

from cgmllm.cli import default_model_dir
from cgmllm.training.convert import build_main
from cgmllm.training.remote_code import REFRESH_COMMAND, refresh_remote_code


def test_shipped_checkpoint_code_equals_the_package():
    folder = default_model_dir()
    stale = refresh_remote_code(folder, check=True)
    assert not stale, (
        f"The remote-code copies in {folder} differ from the package: {stale}. "
        f"Run `{REFRESH_COMMAND.format(folder='checkpoints/tiny-world')}` and commit the result."
    )


@pytest.fixture
def stale_copy(tmp_path):
    folder = tmp_path / "tiny-world"
    shutil.copytree(default_model_dir(), folder)
    modeling = folder / "model" / "modeling_cgmllm.py"
    modeling.write_text(modeling.read_text() + "\n# an edit that was never made in the package\n")
    (folder / "vae" / "old_helper.py").write_text("x = 1\n")
    config = json.loads((folder / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_cgmllm.SomethingElse"}
    (folder / "model" / "config.json").write_text(json.dumps(config))
    return folder


def test_refresh_reports_then_fixes_every_stale_copy(stale_copy):
    weights = (stale_copy / "model" / "model.safetensors").read_bytes()
    expected = ["model/modeling_cgmllm.py", "vae/old_helper.py (not written by the package)", "model/config.json"]
    assert refresh_remote_code(stale_copy, check=True) == expected
    assert (stale_copy / "vae" / "old_helper.py").is_file()  # check changes nothing

    assert refresh_remote_code(stale_copy) == expected
    assert refresh_remote_code(stale_copy, check=True) == []
    assert not (stale_copy / "vae" / "old_helper.py").exists()
    shipped = (default_model_dir() / "model" / "modeling_cgmllm.py").read_bytes()
    assert (stale_copy / "model" / "modeling_cgmllm.py").read_bytes() == shipped
    assert (stale_copy / "model" / "model.safetensors").read_bytes() == weights  # weights are never rewritten
    shipped_config = json.loads((default_model_dir() / "model" / "config.json").read_text())
    assert json.loads((stale_copy / "model" / "config.json").read_text())["auto_map"] == shipped_config["auto_map"]


def test_build_command_check_mode_exits_1_and_names_the_fix(stale_copy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--refresh-remote-code", str(stale_copy), "--check"])
    assert exit_info.value.code == 1
    assert "cgmllm-build --refresh-remote-code" in capsys.readouterr().err
    assert build_main(["--refresh-remote-code", str(stale_copy)])  # rewrites, returns what it rewrote
    assert build_main(["--refresh-remote-code", str(stale_copy), "--check"]) == []


def test_refresh_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="not a saved pipeline folder"):
        refresh_remote_code(tmp_path)
    with pytest.raises(SystemExit):
        build_main(["--refresh-remote-code", str(tmp_path), "--out", str(tmp_path)])
