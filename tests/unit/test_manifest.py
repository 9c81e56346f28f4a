"""Artifact manifests: hashes written last, checked by `models add` and before every load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medserve import manifest as mf
from medserve.cli import app
from medserve.errors import ConfigError
from medserve.registry import load_registry
from tests.conftest import flat_spec, llama, smollm2_path

runner = CliRunner()


def artifact(directory: Path, kind: str = "gguf") -> Path:
    """A directory shaped like `medserve quantize` output, with a small stand-in weights file."""
    directory.mkdir()
    (directory / "med-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (directory / "med-q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
    (directory / ".hidden").write_text("editor litter")
    report: dict[str, Any] = {
        "eval_text": {"file": "eval.txt"},
        "artifacts": [
            {"type": t, "file": f"med-{t}.gguf", "perplexity": p, "perplexity_change_pct": c}
            for t, p, c in (("q4_k_m", 25.7, 10.8), ("q8_0", 23.2, 0.01))
        ],
    }
    mf.write(
        directory,
        {"kind": kind, "name": "Med", "model": {"context_length": 8192}, "report": report},
    )
    return directory


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_but_itself_and_hidden_ones(tmp_path: Path) -> None:
    art = artifact(tmp_path / "a")
    manifest = mf.load(art)
    assert manifest["format"] == mf.FORMAT
    assert set(manifest["files"]) == {"med-q4_k_m.gguf", "med-q8_0.gguf"}
    entry = manifest["files"]["med-q8_0.gguf"]
    assert entry == {"sha256": mf.sha256_file(art / "med-q8_0.gguf"), "bytes": 68}
    assert mf.check_tree(art) == []
    assert mf.check_file(art / mf.NAME, art / "med-q8_0.gguf") == entry["sha256"]


def test_any_change_is_caught(tmp_path: Path) -> None:
    art = artifact(tmp_path / "a")
    flip_last_byte(art / "med-q4_k_m.gguf")
    (art / "med-q8_0.gguf").unlink()
    assert mf.check_tree(art) == ["med-q4_k_m.gguf: sha256 differs", "med-q8_0.gguf: missing"]
    with pytest.raises(mf.ManifestError, match="does not match its manifest.*refusing"):
        mf.check_file(art / mf.NAME, art / "med-q4_k_m.gguf")


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: (d / "extra.gguf").write_bytes(b"x"), "not listed"),
        (lambda d: (d / mf.NAME).write_text("{"), "unreadable"),
        (lambda d: (d / mf.NAME).write_text('{"format": "other"}'), "not a medserve artifact"),
        (lambda d: (d / mf.NAME).unlink(), "no manifest"),
    ],
)
def test_unusable_manifests_are_refused(tmp_path: Path, setup: Any, expected: str) -> None:
    art = artifact(tmp_path / "a")
    setup(art)
    target = art / "extra.gguf" if expected == "not listed" else art / "med-q8_0.gguf"
    with pytest.raises(mf.ManifestError, match=expected):
        mf.check_file(art / mf.NAME, target)


def test_a_file_outside_the_artifact_is_refused(tmp_path: Path) -> None:
    art = artifact(tmp_path / "a")
    outside = tmp_path / "med-q8_0.gguf"
    shutil.copy(art / "med-q8_0.gguf", outside)
    with pytest.raises(mf.ManifestError, match="not inside"):
        mf.check_file(art / mf.NAME, outside)


def test_registry_spec_with_a_manifest_verifies_the_weights(tmp_path: Path) -> None:
    art = artifact(tmp_path / "a")
    models = tmp_path / "models"
    models.mkdir()
    (models / "med.toml").write_text(
        'id = "med"\npath = "../a/med-q8_0.gguf"\nmanifest = "../a/manifest.json"\n'
    )
    (spec,) = load_registry(models)
    assert llama(spec).manifest == models / "../a/manifest.json"
    assert llama(spec).verified_weights("med") == (art / "med-q8_0.gguf").resolve()
    flip_last_byte(art / "med-q8_0.gguf")
    with pytest.raises(ConfigError, match="model 'med'.*does not match its manifest"):
        llama(spec).verified_weights("med")
    # Without a manifest the same file loads: the check is opt-in per registry entry.
    assert llama(flat_spec(id="m", path=art / "med-q8_0.gguf")).verified_weights("m").is_file()


def test_models_add_registers_a_verified_gguf(tmp_path: Path) -> None:
    art = artifact(tmp_path / "a")
    models = tmp_path / "models"
    done = runner.invoke(app, ["models", "add", str(art), "--models-dir", str(models)])
    assert done.exit_code == 0, done.stderr
    (spec,) = load_registry(models)
    replica = llama(spec)
    assert (spec.id, replica.engine, replica.context_length) == ("med-q4_k_m", "llamacpp", 4096)
    assert replica.path == art / "med-q4_k_m.gguf" and replica.manifest == art / mf.NAME
    assert spec.defaults.repeat_penalty == 1.1

    again = runner.invoke(app, ["models", "add", str(art), "--models-dir", str(models)])
    assert again.exit_code == 2 and "--force" in again.stderr
    chosen = runner.invoke(
        app,
        ["models", "add", str(art), "-t", "q8_0", "--id", "med-small", "--models-dir", str(models)],
    )
    assert chosen.exit_code == 0, chosen.stderr
    assert {s.id for s in load_registry(models)} == {"med-q4_k_m", "med-small"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("tamper", "does not match its manifest: med-q4_k_m.gguf: sha256 differs"),
        ("gptq", "GPTQ (compressed-tensors) artifact, served by vLLM"),
        ("type", "--type: the artifact holds q4_k_m, q8_0"),
        ("none", "no manifest"),
    ],
)
def test_models_add_refuses(tmp_path: Path, change: str, expected: str) -> None:
    art = artifact(tmp_path / "a", kind="gptq" if change == "gptq" else "gguf")
    args = ["models", "add", str(art), "--models-dir", str(tmp_path / "models")]
    if change == "tamper":
        flip_last_byte(art / "med-q4_k_m.gguf")
    elif change == "type":
        args += ["--type", "q2_k"]
    elif change == "none":
        (art / mf.NAME).unlink()
    done = runner.invoke(app, args)
    assert done.exit_code == 2
    assert expected in " ".join(done.stderr.split())
    assert not (tmp_path / "models").exists()


@pytest.mark.engine
@pytest.mark.anyio
async def test_engine_refuses_weights_that_changed(tmp_path: Path) -> None:
    from medserve.engines.llamacpp import LlamaCppEngine

    art = tmp_path / "smol"
    art.mkdir()
    gguf = art / "smol-q4_1.gguf"
    shutil.copy(smollm2_path(), gguf)
    mf.write(art, {"kind": "gguf", "name": "smol", "model": {}, "report": {"artifacts": []}})
    spec = flat_spec(id="smol", path=gguf, manifest=art / mf.NAME, context_length=256, parallel=1)
    engine = LlamaCppEngine(spec)
    await engine.start()
    await engine.close()
    flip_last_byte(gguf)
    with pytest.raises(ConfigError, match="does not match its manifest"):
        await LlamaCppEngine(spec).start()
    assert json.loads((art / mf.NAME).read_text())["files"]["smol-q4_1.gguf"]["bytes"] > 0
