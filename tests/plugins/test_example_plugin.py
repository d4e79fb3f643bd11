"""The example plugin package, installed with pip, is discovered through its entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "presso-example-plugin"

pytestmark = pytest.mark.integration

PROBE = """
import json, torch, presso, sys
sys.path.insert(0, {tests!r})
from models import build
names = presso.list_passes()
out = {{"passes": names}}
if "fold_batchnorm" in names:
    from presso.testing import check_pass
    model, x = build("cnn")
    check_pass(presso.make_pass("fold_batchnorm"), model, x, tolerance=1e-4)  # numerics, no mutation, JSON
    compiled = presso.compile(model, ["fold_batchnorm", "quantize_dynamic_int8"], example_inputs=x)
    rec = compiled.report["passes"]
    out.update(folded=rec[0]["stats"]["folded"], step_error=rec[0]["rel_error_step"],
               plugin=compiled.manifest["passes"][0]["plugin"], versions=compiled.manifest["plugins"])
print(json.dumps(out))
"""


def probe(extra_path: Path | None) -> dict:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    code = PROBE.format(tests=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True, timeout=300)
    return target


def test_installed_plugin_is_listed_and_runs(installed):
    result = probe(installed)
    assert "fold_batchnorm" in result["passes"] and "quantize_dynamic_int8" in result["passes"]
    assert result["folded"] == 3  # the conv -> bn edges of TinyCNN: stem, block.conv1, block.conv2
    assert result["step_error"] < 1e-4  # folding is exact up to float rounding
    assert result["plugin"] == "presso-example-plugin:fold_batchnorm"
    assert result["versions"]["presso-example-plugin:fold_batchnorm"] == "0.1.0"


def test_without_the_package_the_pass_is_gone():
    assert "fold_batchnorm" not in probe(None)["passes"]
