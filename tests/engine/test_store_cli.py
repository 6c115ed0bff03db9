"""`vgate models add|list|verify|remove` on real files: output and exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.store.store import Store
from proxy.cli import models as store_cli
from tests.engine.store_helpers import add, flip, model_dir
from tests.engine.test_store_oci import TAR, Layout, tar


def models(*argv: str) -> int:
    """Run `vgate models ARGV` as the `vgate` parser registers it."""
    parser = argparse.ArgumentParser(prog="vgate")
    store_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    code: int = args.func(args)
    return code


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def test_add_list_verify_remove(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = model_dir(tmp_path / "src")
    assert models("add", "tiny", str(src), "--store", root) == 0
    out = capsys.readouterr().out
    ref = out.split("added ")[1].split(" ")[0]
    assert out == (
        f"added {ref} (3 files, 1.0 MiB; 3 written to the store)\n"
        f'pin it in an engine: model = "{ref}"\n'
    )
    assert models("add", "tiny", str(src), "--store", root) == 0
    assert capsys.readouterr().out.startswith(f"unchanged: {ref} is already the current")

    assert models("list", "--store", root) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{ref}  1.0 MiB  3 files  added 20") and line.endswith("(current)")

    assert models("verify", "--store", root) == 0
    captured = capsys.readouterr()
    assert captured.out == f"OK  {ref}\n"
    assert captured.err == "hashing 3 files (1.0 MiB)\n"

    assert models("remove", "tiny", "--store", root) == 0
    assert capsys.readouterr().out == "removed tiny: deleted 1 model, 3 files (1.0 MiB)\n"
    assert models("list", "--store", root) == 0
    assert capsys.readouterr().out == f"no models in {root}\n"


def test_verify_names_the_bad_files_and_exits_1(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    added = add(Store(root), "tiny", model_dir(tmp_path / "src"))
    flip(Store(root).layout.tree(added.ref.hex) / "tokenizer" / "vocab.txt")
    assert models("verify", "tiny", "--store", root) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"BAD {added.ref}"
    assert out[1].startswith("  tokenizer/vocab.txt: sha256 differs (manifest ")
    assert len(out) == 2


def test_refusals_exit_2_with_the_reason(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = model_dir(tmp_path / "src")
    (src / "leak").symlink_to("/etc/passwd")
    assert models("add", "tiny", str(src), "--store", root) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vgate models: {src / 'leak'}: a symbolic link to /etc/passwd")
    assert models("remove", "tiny", "--store", root) == 2
    assert "vgate models: model 'tiny' is not in the store" in capsys.readouterr().err
    assert models("add", "tiny", str(tmp_path / "nowhere"), "--store", root) == 2
    assert f"{tmp_path / 'nowhere'}: not a directory" in capsys.readouterr().err
    assert models("add", "tiny", str(src), "--ref", "v1", "--store", root) == 2
    assert "--ref and --subdir are for OCI image layouts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        models("add", "--store", root)
    assert usage.value.code == 2


def test_the_store_from_the_environment_and_an_oci_source(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(store_cli.STORE_ENV, root)
    image = Layout(tmp_path / "image")
    for tag in ("v1", "v2"):
        image.image([image.blob(tar([("config.json", json.dumps(tag).encode())]), TAR)], ref=tag)
    assert models("add", "tiny", str(image.root), "--ref", "v2") == 0
    assert capsys.readouterr().out.startswith("added tiny@sha256:")
    [row] = Store(root).models()
    tree = Store(root).resolve(f"tiny@sha256:{row.hex}")
    assert json.loads((tree / "config.json").read_bytes()) == "v2"


def test_through_the_vgate_command(root: str, tmp_path: Path) -> None:
    vgate = Path(sys.executable).with_name("vgate")
    src = model_dir(tmp_path / "src")
    added = subprocess.run(
        [vgate, "models", "add", "tiny", str(src), "--store", root],
        capture_output=True,
        text=True,
        check=True,
    )
    ref = added.stdout.split('model = "')[1].split('"')[0]
    flip(Store(root).resolve(ref) / "config.json")
    verify = subprocess.run(
        [vgate, "models", "verify", ref, "--store", root], capture_output=True, text=True
    )
    assert verify.returncode == 1
    bad, problem = verify.stdout.splitlines()
    assert bad == f"BAD {ref}" and problem.startswith("  config.json: sha256 differs")


def _pinned_config(tmp_path: Path, root: str, model: str, marker: Path) -> Path:
    # The engine's "python" records that it ran: vLLM must never start on bad files.
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho ran > {marker}\n")
    python.chmod(0o755)
    config = tmp_path / "vgate.toml"
    config.write_text(
        '[models.tiny]\nupstreams = ["engine:tiny"]\n\n'
        f'[engines.tiny]\nmodel = "{model}"\nmodel_store = "{root}"\npython = "{python}"\n'
    )
    return config


def test_an_engine_whose_pinned_files_changed_refuses_to_start(root: str, tmp_path: Path) -> None:
    added = add(Store(root), "tiny", model_dir(tmp_path / "src"))
    marker = tmp_path / "vllm-ran"
    config = _pinned_config(tmp_path, root, str(added.ref), marker)
    vgate = [sys.executable, "-m", "proxy.cli"]
    check = subprocess.run([*vgate, "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    args = subprocess.run([*vgate, "engine", "args", "tiny", "--config", str(config)],
                          capture_output=True, text=True)  # fmt: skip
    assert f"--model {Store(root).layout.tree(added.ref.hex)}" in args.stdout

    flip(Store(root).layout.tree(added.ref.hex) / "model.safetensors", offset=4096)
    run = subprocess.run([*vgate, "engine", "run", "tiny", "--config", str(config)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2
    assert "refusing to start" in run.stderr and "model.safetensors" in run.stderr
    assert not marker.exists(), "vLLM was started on files that do not match their digest"


def test_check_config_names_a_pin_the_store_does_not_hold(root: str, tmp_path: Path) -> None:
    added = add(Store(root), "tiny", model_dir(tmp_path / "src"))
    other = f"tiny@sha256:{'0' * 64}"
    config = _pinned_config(tmp_path, root, other, tmp_path / "unused")
    check = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(config)],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 2
    assert "engines.tiny.model:" in check.stderr
    assert added.ref.hex[:12] in check.stderr  # it says which digest the name does hold
