"""The package as a user installs it: sdist -> wheel -> a fresh venv with no source tree on the path.

Tests otherwise run on the editable install, which reads files straight from src/ and so never notices a file
the wheel leaves out. Here the wheel is built from the sdist (so both must carry every file the package reads
at run time), installed into a new venv, and used from a folder that has no source tree: one training step
with a built-in template, the demo config and data, `sftune demo --help`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from sftune.data.templates import BUILTIN_TEMPLATES, read_builtin
from tests.conftest import REPO

SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE", "src")


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build_sdist_and_wheel(tmp: Path) -> tuple[Path, Path]:
    """The sdist from a copy of the source, then the wheel from the unpacked sdist (offline: no build isolation)."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, source / name)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp / 'dist')!r}))"
    sdist = tmp / "dist" / run([sys.executable, "-c", code], cwd=source).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").iterdir())
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), "."],
        unpacked,
    )
    return sdist, next((tmp / "dist").glob("sftune-*.whl"))


def fresh_venv_with(wheel: Path, tmp: Path) -> Path:
    """A new venv holding only the wheel; torch & co. come from this environment's site-packages, appended by a
    .pth line (a plain path line: the editable install's own .pth hook there is never run)."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp)
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    )
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_wheel_installs_and_trains_with_a_builtin_template(tmp_path, tiny_model_dir):
    sdist, wheel = build_sdist_and_wheel(tmp_path)
    with tarfile.open(sdist) as archive:
        sdist_names = archive.getnames()
    wheel_names = zipfile.ZipFile(wheel).namelist()
    for name in BUILTIN_TEMPLATES:
        assert f"sftune/data/templates/{name}.jinja" in wheel_names
        assert any(n.endswith(f"src/sftune/data/templates/{name}.jinja") for n in sdist_names)
    for path in ("sftune/demo/demo.yaml", "sftune/demo/data/train.jsonl", "sftune/demo/data/heldout.jsonl"):
        assert path in wheel_names
    assert any(n.endswith("/LICENSE") for n in wheel_names) and any(n.endswith("/LICENSE") for n in sdist_names)

    venv = fresh_venv_with(wheel, tmp_path)
    work = tmp_path / "work"  # no source tree here or on the path
    work.mkdir()
    where = run([str(venv / "bin" / "python"), "-c", "import sftune; print(sftune.__file__)"], work).stdout.strip()
    assert where.startswith(str(venv)), f"sftune imported from {where}, not from the installed wheel"

    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(4)
    ]
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "fp32"},
        "data": {"train": "chat.jsonl"},
        "template": {"name": "chatml"},  # a built-in: read from the installed package
        "train": {"max_steps": 1, "micro_batch_size": 2, "progress": False, "precision": "fp32"},
        "output": {"dir": str(work / "run")},
    }
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    run([str(venv / "bin" / "sftune"), "train", "run.yaml"], work)
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    assert manifest["global_step"] == 1 and manifest["template"]["name"] == "chatml"
    saved = json.loads((work / "run" / "model" / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None:  # newer tokenizers save the template beside the config
        saved = (work / "run" / "model" / "chat_template.jinja").read_text()
    assert saved == read_builtin("chatml")

    check = "from sftune.recipes.demo import demo_config; c = demo_config(); print(c.data.train, c.data.validation)"
    demo_data = run([str(venv / "bin" / "python"), "-c", check], work).stdout.split()
    assert all(Path(p).is_file() and Path(p).is_relative_to(venv) for p in demo_data)
    help_text = run([str(venv / "bin" / "sftune"), "demo", "--help"], work).stdout
    assert "usage: sftune demo" in help_text
