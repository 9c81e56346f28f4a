"""What the images declare, read from the Containerfiles themselves (no podman needed).

Both the CPU image (Containerfile) and the GPU variant (Containerfile.vllm) must: set every
offline variable of ``medserve.privacy.OFFLINE_ENV`` to its value, run as a numeric non-root
user, expose port 8000 only, keep a HEALTHCHECK on loopback, and keep the audit log, keys
and engine state on the one volume, with settings names that medserve's own settings model
reads back to those paths. 0.0.0.0 is bound only inside the container (the container's
network namespace: its loopback is unreachable from a published port); the server's own
default stays loopback. scripts/check-image.sh checks the built image the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medserve.config import Settings, load_settings
from medserve.privacy import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
VOLUME = "/var/lib/medserve"
FILES = ["Containerfile", "Containerfile.vllm"]
BASE_ARG = {"Containerfile": "PYTHON_IMAGE", "Containerfile.vllm": "VLLM_IMAGE"}


@dataclass
class Stage:
    """One FROM ... stage: its base, its name, and its instructions (keyword, arguments)."""

    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.steps if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {word!r}: use KEY=VALUE"
                out[key] = value
        return out


def parse(path: Path) -> tuple[list[str], list[Stage]]:
    """The global ARG lines and the stages of a Containerfile (comments and continuations
    handled as buildah does: comment lines inside a continued instruction are dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: a continuation runs past the end"
    global_args: list[str] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may come before the first FROM"
            global_args.append(args)
        else:
            stages[-1].steps.append((keyword, args))
    return global_args, stages


def final(name: str) -> Stage:
    return parse(ROOT / name)[1][-1]


SETTINGS_FILE = "/etc/medserve/medserve.toml"


def image_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What medserve in the image reads: the settings file the image ships, at the path its
    MEDSERVE_CONFIG names, with the image's MEDSERVE_* variables (and no others) over it."""
    stage = final(name)
    env = stage.env()
    assert env.get("MEDSERVE_CONFIG") == SETTINGS_FILE
    sources = [a.split()[0] for a in stage.all("COPY") if a.split()[-1] == SETTINGS_FILE]
    assert len(sources) == 1, "the settings file is copied to MEDSERVE_CONFIG once"
    for key in [k for k in os.environ if k.startswith("MEDSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("MEDSERVE_") and key != "MEDSERVE_CONFIG":
            monkeypatch.setenv(key, value)
    return load_settings(ROOT / sources[0])


@pytest.mark.parametrize("name", FILES)
def test_settings_are_a_file_a_site_can_mount_not_env(name: str) -> None:
    """ENV beats the file (file < env < flags): a MEDSERVE_* setting baked as ENV would
    silently override the file a site mounts at MEDSERVE_CONFIG (the fresh user's finding)."""
    baked = [k for k in final(name).env() if k.startswith("MEDSERVE_") and k != "MEDSERVE_CONFIG"]
    assert not baked
    cmd = " ".join(final(name).all("CMD") + final(name).all("ENTRYPOINT"))
    # No flag on the command line either: a flag beats the file too.
    assert "--" not in cmd.replace("[", " "), cmd


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize(("variable", "value"), sorted(OFFLINE_ENV.items()))
def test_every_offline_variable_is_set_to_its_value(name: str, variable: str, value: str) -> None:
    assert final(name).env().get(variable) == value


@pytest.mark.parametrize("name", FILES)
def test_runs_as_a_numeric_non_root_user(name: str) -> None:
    users = final(name).all("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot verify it.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]


@pytest.mark.parametrize("name", FILES)
def test_exposes_only_the_api_port(name: str) -> None:
    stage = final(name)
    ports = [p for args in stage.all("EXPOSE") for p in args.split()]
    assert ports == ["8000"]


@pytest.mark.parametrize("name", FILES)
def test_the_image_settings_listen_on_the_exposed_port(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert image_settings(name, monkeypatch).port == 8000


@pytest.mark.parametrize("name", FILES)
def test_healthcheck_asks_health_on_loopback(name: str) -> None:
    checks = final(name).all("HEALTHCHECK")
    assert len(checks) == 1 and "NONE" not in checks[0].upper()
    command = json.loads(checks[0][checks[0].index("CMD") + 3 :])
    assert any("http://127.0.0.1:8000/health" in word for word in command), command


@pytest.mark.parametrize("name", FILES)
def test_binds_all_interfaces_only_inside_the_container(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = final(name)
    assert image_settings(name, monkeypatch).host == "0.0.0.0"
    # Nothing else sets the address: not the command line, not a variable.
    cmd = " ".join(stage.all("CMD") + stage.all("ENTRYPOINT"))
    assert "--host" not in cmd and "0.0.0.0" not in cmd
    assert not {k: v for k, v in stage.env().items() if "0.0.0.0" in v}
    # Outside a container the server's own default stays loopback.
    assert Settings.model_fields["host"].default == "127.0.0.1"


@pytest.mark.parametrize("name", FILES)
def test_audit_keys_and_state_live_on_the_volume(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = final(name)
    volumes = [v for args in stage.all("VOLUME") for v in args.split()]
    assert volumes == [VOLUME]
    # Read back through medserve's settings model: a misspelled key fails (extra="forbid")
    # instead of leaving the log in the default var/audit.db, in the writable layer.
    settings = image_settings(name, monkeypatch)
    for path in (settings.audit.path, settings.auth.keys_path, settings.state_dir):
        assert path.is_relative_to(VOLUME), path
    assert settings.models_dir == Path("/srv/medserve/models")


@pytest.mark.parametrize("name", FILES)
def test_every_stage_builds_on_the_overridable_base(name: str) -> None:
    global_args, stages = parse(ROOT / name)
    arg = BASE_ARG[name]
    assert any(a.startswith(f"{arg}=") for a in global_args)
    # Every stage: an air-gapped site passes its own base once for the whole file.
    assert [s.base for s in stages] == [f"${{{arg}}}"] * len(stages)


@pytest.mark.parametrize("name", FILES)
def test_the_build_stage_copies_every_forced_include(name: str) -> None:
    """pyproject force-includes quant/: a build stage without it fails (the old bug)."""
    forced = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["force-include"]
    build = parse(ROOT / name)[1][0]
    copied = {args.split()[0].rstrip("/") for args in build.all("COPY")}
    assert set(forced) <= copied


@pytest.mark.parametrize("name", FILES)
def test_wheels_reach_the_final_stage_by_mount_not_by_copy(name: str) -> None:
    """A COPY --from of the wheels keeps them in a layer even after an rm (145 MB)."""
    stage = final(name)
    assert not [c for c in stage.all("COPY") if re.search(r"--from=\S+\s+/wheels/?\s", c)]
    assert any("--mount=type=bind,from=build" in r and "/wheels" in r for r in stage.all("RUN"))


def test_build_context_is_an_allow_list() -> None:
    """var/ holds a dev server's audit keys, .venv a whole environment: never in a build."""
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"
    included = [p[1:] for p in patterns if p.startswith("!")]
    for secret in ("var", ".venv", ".git", "models/*.gguf"):
        assert secret not in included
    # Everything the Containerfiles copy from the context is let in.
    sources = [
        src
        for name in FILES
        for stage in parse(ROOT / name)[1]
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
        if "$" not in src
    ]
    assert sources
    for src in sources:
        assert any(src.rstrip("/") == inc or src.startswith(inc + "/") for inc in included), src
