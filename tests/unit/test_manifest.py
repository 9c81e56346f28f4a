"""Artifact manifests: hashes written last, checked by `models add` and before every load."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medserve import manifest as mf
from medserve.cli import app
from medserve.engines.vllm import VllmEngine, VllmSpec
from medserve.errors import ConfigError, EngineError
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
        ("gptq", "GPTQ (compressed-tensors) artifact, served by vLLM: give --vllm-python"),
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


def gptq_artifact(directory: Path) -> Path:
    """A directory shaped like `medserve quantize --to gptq` output (stand-in weights)."""
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    (directory / "config.json").write_text('{"quantization_config": {"quant_method": "x"}}')
    (directory / "tokenizer.json").write_text("{}")
    art: dict[str, Any] = {"type": "w4a16-g64", "file": ["model.safetensors"], "format": "gptq"}
    art |= {"perplexity": 30.1, "perplexity_change_pct": 32.9}
    report = {"eval_text": {"file": "eval.txt"}, "artifacts": [art]}
    mf.write(
        directory,
        {"kind": "gptq", "name": "Smol", "model": {"context_length": 8192}, "report": report},
    )
    return directory


def test_models_add_registers_a_gptq_artifact_on_supervised_vllm(tmp_path: Path) -> None:
    art = gptq_artifact(tmp_path / "smol-gptq")
    python = tmp_path / "vllm-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)  # a venv's python: kept as given, not resolved
    models = tmp_path / "models"
    args = ["models", "add", str(art), "--models-dir", str(models), "--vllm-python", str(python)]
    done = runner.invoke(app, [*args, "--vllm-arg=--dtype", "--vllm-arg=bfloat16"])
    assert done.exit_code == 0, done.stderr
    (spec,) = load_registry(models)
    (replica,) = spec.replicas
    assert isinstance(replica, VllmSpec) and replica.launch is not None
    assert spec.id == "smol-w4a16-g64" and replica.url is None
    assert replica.launch.python == python and replica.launch.model == art
    assert replica.launch.args == ("--max-model-len", "4096", "--dtype", "bfloat16")
    assert replica.manifest == art / mf.NAME

    # The entry's manifest guards the weights: a changed file refuses to start, before any
    # process is spawned.
    flip_last_byte(art / "model.safetensors")
    engine = VllmEngine(spec, replica)
    with pytest.raises(EngineError, match="does not match its manifest.*model.safetensors"):
        asyncio.run(engine.start())
    assert engine.supervisor is not None and engine.supervisor.dirs is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--vllm-python", "/nonexistent/python"], "is not a file"),
        (["--vllm-python", sys.executable, "--vllm-arg=--port=1"], "--port cannot be given"),
    ],
)
def test_models_add_refuses_a_bad_vllm_entry(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    art = gptq_artifact(tmp_path / "a")
    done = runner.invoke(
        app, ["models", "add", str(art), "--models-dir", str(tmp_path / "m"), *extra]
    )
    assert done.exit_code == 2 and expected in " ".join(done.stderr.split())
    assert not (tmp_path / "m").exists()


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
