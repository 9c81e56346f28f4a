"""The registry's two forms (flat and `replicas`), their refusals, and the module graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from medserve.config import ModelSpec, load_settings
from medserve.engines.vllm import VllmSpec
from medserve.errors import ConfigError
from medserve.registry import load_registry, served_models, spec_from_cli
from tests.conftest import ROOT

NESTED = '[[replicas]]\nengine = "llamacpp"\npath = "/m/x.gguf"\n'


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda d: load_registry(_file(d, 'id = "x"\npath = "/m/x.gguf"\n')), id="flat"
        ),
        pytest.param(
            lambda d: load_registry(
                _file(d, 'id = "x"\nengine = "llamacpp"\npath = "/m/x.gguf"\n')
            ),
            id="flat-engine",
        ),
        pytest.param(lambda d: load_registry(_file(d, f'id = "x"\n{NESTED}')), id="replicas"),
        pytest.param(lambda d: [spec_from_cli("/m/x.gguf")], id="cli-path"),
        pytest.param(lambda d: [spec_from_cli("x=/m/x.gguf")], id="cli-id"),
        pytest.param(
            lambda d: list(
                load_settings(
                    _file(d, f'[[models]]\nid = "x"\n{NESTED.replace("[[", "[[models.")}', "c.toml")
                ).models
            ),
            id="inline-replicas",
        ),
    ],
)
def test_every_form_gives_the_same_spec(tmp_path: Path, make: object) -> None:
    expected = ModelSpec.model_validate(
        {"id": "x", "replicas": [{"engine": "llamacpp", "path": Path("/m/x.gguf")}]}
    )
    assert callable(make)
    (spec,) = make(tmp_path)
    assert spec == expected


def test_fake_flat_form_keeps_its_token_delay(tmp_path: Path) -> None:
    flat = load_registry(_file(tmp_path, 'id = "f"\nengine = "fake"\nfake_token_delay_s = 0.5\n'))
    nested = ModelSpec.model_validate(
        {"id": "f", "replicas": [{"engine": "fake", "token_delay_s": 0.5}]}
    )
    assert flat == [nested]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f'id = "x"\nthreads = 2\n{NESTED}', "models.x: Value error, give the engine settings"),
        ('id = "x"\n[[replicas]]\nengine = "tgi"\n', "models.x.replicas[0]: Input tag 'tgi'"),
        ('id = "x"\nengine = "tgi"\n', "models.x: Input tag 'tgi'"),
        (
            'id = "x"\n[[replicas]]\nengine = "vllm"\n',
            "models.x.replicas[0]: Value error, give exactly one of `url`",
        ),
        (
            'id = "x"\nengine = "vllm"\n[launch]\nmodel = "/m"\npython = "/p"\nargs = ["--port=1"]',
            "models.x.launch.args: Value error, --port cannot be given",
        ),
        ('id = "x"\nengine = "vllm"\nurl = "x:1"\n', "models.x.url: Value error, url must be"),
        (f'id = "x"\n{NESTED}threads = 0\n', "models.x.replicas[0].threads: Input should be"),
        (f'id = "x"\n{NESTED}{NESTED}colour = 1\n', "models.x.replicas[1].colour: Extra inputs"),
        (
            'id = "x"\n[[replicas]]\nengine = "llamacpp"\n',
            "models.x.replicas[0]: Value error, give exactly one",
        ),
        ('id = "x"\nthreads = 0\npath = "/m"\n', "models.x.threads: Input should be"),
        ('id = "x"\nreplicas = []\n', "models.x.replicas: Tuple should have at least 1"),
    ],
)
def test_refusals_name_the_entry(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_registry(_file(tmp_path, text))
    assert fragment in str(err.value)


def test_replicas_paths_are_relative_to_their_file(tmp_path: Path) -> None:
    text = 'id = "x"\n[[replicas]]\nengine = "llamacpp"\npath = "a.gguf"\nmanifest = "m.json"\n'
    (spec,) = load_registry(_file(tmp_path, text))
    replica = spec.replicas[0]
    assert (replica.path, replica.manifest) == (tmp_path / "a.gguf", tmp_path / "m.json")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("how", "value"),
    [("file-old", "old"), ("file-new", "new"), ("env-old", "old"), ("env-new", "new")],
)
def test_instance_takes_the_old_replica_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, value: str
) -> None:
    name = "replica" if how.endswith("old") else "instance"
    config = None
    if how.startswith("file"):
        config = _file(tmp_path, f'{name} = "{value}"\n', "c.toml")
    else:
        monkeypatch.setenv(f"MEDSERVE_{name.upper()}", value)
    assert load_settings(config).instance == value


ORDER = [
    "medserve.manifest",
    "medserve.engines.fake",
    "medserve.engines.llamacpp",
    "medserve.engines.shim",
    "medserve.engines.supervisor",
    "medserve.engines.upstream",
    "medserve.engines.vllm_wire",
    "medserve.engines.vllm",
    "medserve.engines",
    "medserve.config",
    "medserve.registry",
    "medserve.router",
    "medserve.fallback",
    "medserve.quantize.cli",
    "medserve.doctor",
]


@pytest.mark.parametrize("module", ORDER)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """A cycle makes some module fail to import when it comes first; llama_cpp stays out."""
    code = f"import sys, {module}; assert 'llama_cpp' not in sys.modules, 'heavy import'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_import_cycle_among_config_registry_manifest_engines_quantize() -> None:
    """Walk every import (top level and inside functions, not TYPE_CHECKING) as a graph."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "medserve").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = _imports(path)
    watched = {
        n
        for n in graph
        if n in {"medserve.config", "medserve.registry", "medserve.manifest"}
        or n.startswith(("medserve.engines", "medserve.quantize"))
    }
    for start in watched:
        seen: set[str] = set()
        todo = [m for m in graph[start] if m in watched]
        while todo:
            current = todo.pop()
            assert current != start, f"import cycle through {start}"
            if current not in seen:
                seen.add(current)
                todo.extend(m for m in graph.get(current, ()) if m in watched)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("medserve")}


def _file(directory: Path, text: str, name: str = "x.toml") -> Path:
    (directory / name).write_text(text, encoding="utf-8")
    return directory if name == "x.toml" else directory / name


SUPERVISED = '[[replicas]]\nengine = "vllm"\n[replicas.launch]\n{launcher}\nmodel = "weights"\n'


@pytest.mark.parametrize("where", ["registry", "config"])
@pytest.mark.parametrize("launcher", ["python", "command"])
def test_supervised_paths_are_relative_to_their_file(
    tmp_path: Path, where: str, launcher: str
) -> None:
    """`python` and (with it) `model` are files here; with `command`, `model` is the
    container's path and stays as written. The server's state_dir fills in otherwise."""
    line = 'python = "venv/bin/python"' if launcher == "python" else 'command = ["podman"]'
    entry = SUPERVISED.format(launcher=line)
    if where == "registry":
        registry = tmp_path / "models"
        registry.mkdir()
        _file(registry, f'id = "x"\n{entry}')
        settings = load_settings(models_dir=registry)
        base = registry
    else:
        nested = entry.replace("[[replicas]]", "[[models.replicas]]")
        nested = nested.replace("[replicas.launch]", "[models.replicas.launch]")
        text = f'state_dir = "st"\n[[models]]\nid = "x"\n{nested}'
        settings = load_settings(_file(tmp_path, text, "c.toml"))
        base = tmp_path
    (spec,) = served_models(settings)
    (replica,) = spec.replicas
    assert isinstance(replica, VllmSpec) and replica.launch is not None
    launch = replica.launch
    if launcher == "python":
        assert (launch.python, launch.model) == (base / "venv/bin/python", base / "weights")
    else:
        assert (launch.command, launch.model) == (("podman",), Path("weights"))
    expected = tmp_path / "st" if where == "config" else Path("var/state")
    assert launch.state_dir == expected
