"""$GITHUB_STEP_SUMMARY (or --summary FILE.md): the markdown report is appended after a passing and after a
failing export, with untrusted text escaped."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import run_lexport


def test_step_summary_after_a_passing_and_a_failing_export(ckpts: dict, tmp_path: Path) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    res = run_lexport(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                      "--to", "onnx,safetensors", "--output-dir", tmp_path / "dist", "--json", env=env)
    assert res.code == 0, res
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, never replaced
    assert "### lexport: ✅ 2 artifacts written and verified" in text
    assert "| format | file | size | exporter | max abs diff | verdict |" in text
    onnx_row = next(line for line in text.splitlines() if line.startswith("| onnx |"))
    assert "classifier\\.onnx" in onnx_row and "torch\\.onnx\\." in onnx_row
    assert "✅ 6 inputs" in onnx_row
    assert next(line for line in text.splitlines() if line.startswith("| safetensors |")).endswith("✅ bit-exact |")

    # a failing run (a usage error before any artifact): the message and the hint, appended after the first
    res = run_lexport(ckpts["classifier"], "--to", "onnx", "--output-dir", tmp_path / "dist2", env=env)
    assert res.code == 2, res
    second = summary.read_text()[len(text):]
    assert second.startswith("### lexport: ❌ failed: usage (exit 2)")
    assert "**Error**" in second and "needs the LightningModule class" in second
    assert "**What to do**" in second and "--module" in second


def test_summary_flag_verification_failure_and_hostile_text(ckpts: dict, tmp_path: Path) -> None:
    """A verification failure (exit 1) lists the failed artifact; a path holding markdown and HTML stays text."""
    weird = tmp_path / "a|b <img src=x> [x](http:evil) `tick` ##"
    weird.mkdir()
    ckpt = weird / "m.ckpt"
    shutil.copyfile(ckpts["classifier"], ckpt)
    out = tmp_path / "s.md"
    res = run_lexport(ckpt, "--module", "fixtures.modules:MyClassifierModule", "--attr", "model", "--to",
                      "torchscript", "--atol", "0", "--rtol", "0", "--precision", "fp16", "--summary", out,
                      env={"GITHUB_STEP_SUMMARY": str(tmp_path / "unused.md")})
    assert res.code == 1, res
    assert not (tmp_path / "unused.md").exists()  # --summary wins over the environment
    text = out.read_text()
    assert text.startswith("### lexport: ❌ failed: verification (exit 1)")
    row = next(line for line in text.splitlines() if line.startswith("| torchscript |"))
    assert row.endswith("| ❌ FAILED |") and "(not written)" in row
    assert "a\\|b &lt;img src=x&gt; \\[x\\]\\(http\\:evil\\) \\`tick\\` \\#\\#" in text
    assert "<img" not in text and "](http" not in text
    assert row.count(" | ") == 5  # the path's | did not add a column


def test_markdown_escapes_and_fences() -> None:
    from lightning_export.summary import escape, fenced, markdown

    assert escape("x\n# head") == "x \\# head"
    block = fenced("a ``` b ```` c")
    assert block.startswith("`````text\n") and block.endswith("\n`````")
    record = {"ok": True, "artifacts": [{"format": "onnx", "path": "m.onnx", "bytes": 1000, "exporter": "e",
                                         "info": {"size_ratio": 0.27},
                                         "verification": {"passed": True, "inputs_checked": 3, "atol": 0.1,
                                                          "max_abs_diff": 0.01, "agreement": {
                                                              "samples": 300, "agreement": 0.99,
                                                              "artifact_accuracy": 0.95, "eager_accuracy": 0.96}}}],
              "data": {"path": "d.pt"}}
    text = markdown(record)
    assert "| 1.0 kB (0.27× fp32) |" in text
    assert "| onnx | 300 | 99.00% | 95.00% | 96.00% |" in text and "on d\\.pt" in text


def test_failure_is_read_from_the_error_fields() -> None:
    """The summary's message and 'What to do' come from the error's own fields, apart (never split from a text)."""
    from lightning_export.errors import Advice, UsageError
    from lightning_export.summary import Failure, markdown

    failure = Failure.of(UsageError("bad flag", hint="Use --x.", advice=Advice.MAX_GROWTH))
    assert (failure.code, failure.kind, failure.message) == (2, "usage", "bad flag")
    assert failure.hint == f"Use --x.\n{Advice.MAX_GROWTH.text}"
    text = markdown({}, failure)
    assert "```text\nbad flag\n```" in text and f"```text\nUse --x.\n{Advice.MAX_GROWTH.text}\n```" in text
    assert Failure.of(KeyboardInterrupt()) == Failure(130, "interrupted", "interrupted (SIGINT or SIGTERM)")
