"""`medserve quantize` on a tiny real LLaMA with a SentencePiece tokenizer (fast paths)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from medserve import manifest as mf
from medserve.quantize import QuantizeError
from medserve.quantize.progress import Quiet, Stage
from tests.conftest import ROOT
from tests.quant.conftest import QUANT_MARKS, manifest_of, quantize

pytestmark = QUANT_MARKS


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_gguf_with_lora_writes_evaluated_artifacts_and_manifest(
    tiny_llama: Path, tiny_lora: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    mcq = ROOT / "quant" / "mcq-sample.jsonl"
    done = quantize(
        tiny_llama, "--to", "gguf", "--lora", tiny_lora, "-t", "q4_0", "-t", "f16",
        "-t", "q8_0", "--eval-mcq", mcq, "--out", out, "--json",
    )  # fmt: skip
    manifest = manifest_of(done)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "gguf"
    assert manifest["adapter"]["sha256"] == mf.tree_digest(mf.tree_files(tiny_lora))
    assert manifest["source"]["sha256"] == mf.tree_digest(mf.tree_files(tiny_llama))
    # The merged model's identity: the checkpoint's and the adapter's, not the plain one's.
    plain = {"files": mf.tree_files(tiny_llama)}
    merged = mf.identity_of(plain, {"files": mf.tree_files(tiny_lora)})
    assert manifest["source"]["identity"] == mf.source_identity(manifest) == merged
    assert merged != mf.identity_of(plain)
    assert manifest["tools"]["llama-cpp-python"] and manifest["tools"]["converter"]["sha256"]
    assert manifest["options"]["types"] == ["q4_0", "f16", "q8_0"]
    report = manifest["report"]
    arts = {a["type"]: a for a in report["artifacts"]}
    assert list(arts) == ["f16", "q8_0", "q4_0"]
    assert set(manifest["files"]) == {a["file"] for a in arts.values()}
    assert mf.check_tree(out) == []
    original = report["original"]["perplexity"]
    assert arts["f16"]["tokenizer_match"] is True
    assert abs(arts["f16"]["perplexity"] / original - 1) < 1e-3
    assert arts["f16"]["bits_per_weight"] > arts["q8_0"]["bits_per_weight"]
    assert arts["q8_0"]["bits_per_weight"] > arts["q4_0"]["bits_per_weight"]
    for art in arts.values():
        assert art["bytes"] == (out / art["file"]).stat().st_size
        assert art["mcq"]["items"] == 24
        assert 0 <= art["mcq"]["answers_changed"] <= 24
    assert report["eval_mcq"]["file"] == "mcq-sample.jsonl"
    assert report["eval_text"]["tokens_scored"] > 1000
    # Nothing else was left beside it, and the work directory is gone.
    assert partials(tmp_path) == []
    assert not (out / ".work").exists()


def test_lora_merge_changes_outputs_exactly_as_peft(
    tiny_llama: Path, tiny_lora: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medserve.quantize.source import merge_lora

    merge_lora(tiny_llama, tiny_lora, tmp_path / "merged")
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, tiny_lora).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        ours = merged(input_ids=ids).logits
    assert (adapted - plain).abs().max().item() > 1e-2  # the adapter matters
    assert (ours - adapted).abs().max().item() < 1e-4  # and the merge is exactly it


def test_gptq_writes_compressed_tensors_that_load_back(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "gptq"
    done = quantize(
        tiny_llama, "--to", "gptq", "--group-size", "128", "--samples", "8",
        "--seq-len", "64", "--out", out, "--json",
    )  # fmt: skip
    art = manifest_of(done)["report"]["artifacts"][0]
    assert art["quant_method"] == "compressed-tensors"
    assert art["type"] == "w4a16-g128"
    assert art["samples"] == 8
    assert art["bits_per_weight"] < 32
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 128, "group")
    assert (out / "tokenizer.model").is_file()
    assert mf.check_tree(out) == []
    # Recognisable as an artifact of tiny_llama, as a GGUF of it is (see the --force test).
    identity = mf.identity_of({"files": mf.tree_files(tiny_llama)})
    manifest = manifest_of(done)
    assert manifest["source"]["identity"] == mf.source_identity(manifest) == identity


def test_group_size_that_does_not_divide_is_refused_before_calibration(
    tiny_llama: Path, tmp_path: Path
) -> None:
    done = quantize(
        tiny_llama, "--to", "gptq", "--group-size", "96", "--out", tmp_path / "g", check=False
    )
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "--group-size 96" in message and "12 of 14 layers" in message
    assert "Largest valid group size: --group-size 128" in message
    assert not (tmp_path / "g").exists() and partials(tmp_path) == []


class Interrupt(Quiet):
    """Ctrl-C arriving as the named stage begins."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at = at

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        if name.startswith(self.at):
            raise KeyboardInterrupt
        with super().stage(name, total) as stage:
            yield stage


@pytest.mark.parametrize("at", ["convert", "quantize q4_0", "evaluate q4_0"])
def test_interrupt_leaves_no_half_written_artifact(
    tiny_llama: Path, tmp_path: Path, at: str
) -> None:
    from medserve.quantize.pipeline import Options, run

    out = tmp_path / "artifact"
    opts = Options(source=tiny_llama, to="gguf", out=out, types=("q4_0",), eval_tokens=512)
    with pytest.raises(KeyboardInterrupt):
        run(opts, Interrupt(at))
    assert not out.exists()
    assert partials(tmp_path) == []


def test_ctrl_c_during_a_real_run_removes_the_work_directory(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    cmd = [sys.executable, "-m", "medserve", "quantize", str(tiny_llama), "--to", "gptq",
           "--samples", "16", "--out", str(out), "--json"]  # fmt: skip
    # Ctrl-C's default action in the child even when this run's SIGINT is ignored: a shell
    # that starts a command with `&` ignores SIGINT for it, and Python keeps an ignored
    # SIGINT ignored (then the run finished, exit 0, under `bash .ci/run &`).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Interrupt once the run is inside its work directory (bounded wait for it).
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob(".artifact.partial-*/.work")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never started its work"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: nothing was written" in err
    assert not out.exists() and partials(tmp_path) == []


def test_force_replaces_an_existing_artifact_only_when_asked(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    args = (tiny_llama, "--to", "gguf", "-t", "q4_0", "--eval-tokens", "256", "--out", out)
    refused = quantize(*args, check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr
    quantize(*args, "--force")
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    # The same source identity as the GPTQ test's artifact of tiny_llama.
    identity = mf.identity_of({"files": mf.tree_files(tiny_llama)})
    assert mf.source_identity(mf.load(out)) == identity is not None
    assert partials(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["org/some-model", "--to", "gguf"], "never downloads"),
        (["{tiny}", "--to", "gguf", "-t", "q3_k"], "--type must be among"),
        (["{tiny}", "--to", "gptq", "--bits", "3"], "--bits must be 4 or 8"),
        (["{tiny}", "--to", "onnx"], "--to must be gguf or gptq"),
        (["{tiny}", "--to", "gguf", "--lora", "{tiny}"], "not a PEFT adapter"),
        (["{tiny}", "--to", "gguf", "--eval-mcq", "{bad_mcq}"], "line 2: missing or invalid"),
        (["{tiny}", "--to", "gptq", "--calibration", "{bad_mcq}"], "no string `text`"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(
    tiny_llama: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": "A"}\n{"question": 1}\n')
    names = {"tiny": str(tiny_llama), "bad_mcq": str(bad)}
    done = quantize(*(a.format(**names) for a in args), "--out", tmp_path / "o", check=False)
    assert done.returncode == 2, done.stderr
    assert expected in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_missing_extra_names_it(tiny_llama: Path, tmp_path: Path) -> None:
    # A Python where torch cannot be imported, as in a serve-only installation.
    code = (
        "import sys; sys.modules['llmcompressor'] = None; "
        "import importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'llmcompressor' else real(n, *a); "
        "from medserve.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "quantize", str(tiny_llama), "--to", "gptq", "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "missing llmcompressor" in done.stderr and "medserve[quant]" in done.stderr


def test_tokenizer_mismatch_is_reported_as_a_conversion_problem() -> None:
    from medserve.quantize.evaluate import EvalText, check_tokenizer

    text = EvalText("eval.txt", "0" * 64, "text", (1, 5, 6, 7), True, 2, 100)
    check_tokenizer(text, [1, 5, 6, 7])
    with pytest.raises(QuantizeError, match="first difference at token 2.*not quantization loss"):
        check_tokenizer(text, [1, 5, 9, 7])


def _mcq_line(**fields: Any) -> str:
    return json.dumps(fields)


def test_mcq_file_formats(tmp_path: Path) -> None:
    from medserve.quantize.evaluate import load_mcq

    path = tmp_path / "q.jsonl"
    path.write_text(
        "\n".join(
            [
                _mcq_line(question="q1", options={"A": "x", "B": "y"}, answer="B"),
                _mcq_line(question="q2", options=["yes", "no", "maybe"], answer="maybe"),
                _mcq_line(question="q3", options=["a", "b"], answer=0, context="ctx", id="z"),
            ]
        )
    )
    items = load_mcq(path)
    assert [(q.id, q.letters, q.answer) for q in items] == [
        ("1", ("A", "B"), "B"),
        ("2", ("A", "B", "C"), "C"),
        ("z", ("A", "B"), "A"),
    ]
    assert items[2].prompt.startswith("ctx\n\nQuestion: q3\nA. a\nB. b\nAnswer:")


def test_mistral_converts_with_identical_tokens(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Qwen2 is not tested here: transformers 5 gives model_type qwen2 Qwen's own
    # pre-tokenizer whatever tokenizer.json says, and llama.cpp's converter accepts a
    # byte-level BPE only when it knows its vocabulary by hash; Qwen's vocabulary is not
    # available offline.
    from tests.quant.conftest import build_tiny

    source = build_tiny("mistral", tmp_path_factory.mktemp("models") / "tiny-mistral")
    out = source.parent / "gguf"
    done = quantize(source, "--to", "gguf", "-t", "f16", "-t", "q4_k_m", "--out", out, "--json")
    manifest = manifest_of(done)
    assert manifest["model"]["model_type"] == "mistral"
    arts = {a["type"]: a for a in manifest["report"]["artifacts"]}
    assert arts["f16"]["architecture"] == "llama"  # llama.cpp runs Mistral as llama
    assert arts["f16"]["tokenizer_match"] and arts["q4_k_m"]["tokenizer_match"]
    original = manifest["report"]["original"]["perplexity"]
    assert abs(arts["f16"]["perplexity"] / original - 1) < 1e-3
