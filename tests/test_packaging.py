"""tfrobust installed from a wheel, used outside the repository.

The wheel is built from a copy of the sources (nothing is written into the
checkout), installed with ``pip --target`` into a temporary folder, and its
console commands are run from an empty directory with that folder first on
the path, so that they import the installed package and read the configs it
ships, not the checkout's.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tfrobust.commands import main
from tfrobust.config import load_config, packaged_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_CONFIGS = os.path.join(ROOT, "tfrobust", "configs")


def test_every_config_is_packaged_with_a_description():
    names = packaged_configs()
    files = sorted(f[:-5] for f in os.listdir(SOURCE_CONFIGS) if f.endswith(".yaml"))
    assert sorted(names) == files and "cifar10_preactresnet18_at_awp" in names
    assert all(description for description in names.values())


@pytest.mark.parametrize("given", ["cifar10_wrn34_10_trades_awp_s2o", "cifar10_wrn34_10_trades_awp_s2o.yaml",
                                   "configs/cifar10_wrn34_10_trades_awp_s2o.yaml"])
def test_config_by_name_is_the_packaged_file(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    by_name = load_config(given)
    assert by_name.defense.name == "trades+awp+s2o" and by_name.model.name == "wide_resnet"


def test_a_file_path_still_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion_mnist.yaml").write_text("optim:\n  epochs: 3\n")
    assert load_config("fashion_mnist.yaml").optim.epochs == 3


@pytest.mark.parametrize("given", ["no_such_config", "elsewhere/cifar10_preactresnet18_at.yaml"])
def test_unknown_config_name_is_a_one_line_error(given, capsys):
    from tfrobust.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--config", given, "--print-config"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file not found: {given}" in err and "tfrobust configs" in err


def test_tfrobust_command_dispatches(capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(packaged_configs())
    assert main(["train", "--config", "cifar10_preactresnet18_trades_rat", "--epochs", "7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: trades+rat" in printed and "epochs: 7" in printed
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2 and "usage: tfrobust" in capsys.readouterr().out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "tfrobust"), source / "tfrobust",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = work / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("tfrobust-*.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_every_module_and_config(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for folder, _, files in os.walk(os.path.join(ROOT, "tfrobust")):
        for f in files:
            if f.endswith((".py", ".yaml")):
                relative = os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                assert relative in names, relative
    for script in ("tfrobust = tfrobust.commands:run", "tfrobust-train = tfrobust.commands:train",
                   "tfrobust-evaluate = tfrobust.commands:evaluate"):
        assert script in entry_points


@pytest.mark.slow
def test_installed_commands_run_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="3")

    def run(*argv):
        return subprocess.run(list(argv), cwd=empty, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import tfrobust.config as c; print(c.PACKAGED_CONFIGS)")
    assert where.stdout.strip() == str(target / "tfrobust" / "configs"), where.stderr
    listed = run(str(target / "bin" / "tfrobust"), "configs")
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == list(packaged_configs())
    for command in (["tfrobust", "train", "--help"], ["tfrobust-train", "--help"], ["tfrobust-evaluate", "--help"],
                    ["tfrobust", "pseudo-label", "--help"]):
        shown = run(str(target / "bin" / command[0]), *command[1:])
        assert shown.returncode == 0 and "usage:" in shown.stdout, (command, shown.stderr)
    resolved = run(str(target / "bin" / "tfrobust-train"), "--config", "cifar10_preactresnet18_at_awp",
                   "--print-config")
    assert resolved.returncode == 0 and "name: at+awp" in resolved.stdout and "name: preact_resnet18" in resolved.stdout
    assert os.listdir(empty) == []  # nothing was written where the commands ran
