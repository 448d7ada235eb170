"""The wheel installs one namespace: only `mmsoftmoe*` top-level names land in site-packages (no `training`, no
`eval`, which would shadow or collide with other projects' packages)."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                "results", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    return next(out.glob("mmsoftmoe-*.whl"))


def test_wheel_installs_only_mmsoftmoe_names(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    top = {p.name.removesuffix(".py") for p in Path(purelib).iterdir()
           if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert top == {"mmsoftmoe", "mmsoftmoe_cli", "mmsoftmoe_training", "mmsoftmoe_eval"}
    # The packages are whole: the run configs and the model configs ship inside them.
    files = set(zipfile.ZipFile(wheel).namelist())
    assert "mmsoftmoe_training/configs/smoke.yaml" in files
    assert any(f.startswith("mmsoftmoe/models/model_configs/") and f.endswith(".json") for f in files)
    assert sysconfig.get_paths()["purelib"] != purelib
