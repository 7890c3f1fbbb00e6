"""The command line: results on stdout, exit codes by error class (docs/cli.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdcca_edge.cli import main


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("cdcca-edge ")


def test_export_inspect_run(tiny_models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_models["qwen2"]), "--format", "gguf", "--quant", "q8_0",
                 "-o", str(out), "--json"]) == 0
    doc = _json(capsys)
    assert doc["validation"]["passed"] and doc["format"] == "gguf" and doc["quant"] == "q8_0"

    assert main(["inspect", str(out), "--json"]) == 0
    info = _json(capsys)
    assert info["identity"] == doc["identity"] and info["identity_matches_export"]
    assert {t["name"] for t in info["tensors"]} >= {"token_embd.weight", "blk.0.attn_q.bias"}

    assert main(["run", str(out), "--prompt", "question: how many circles are there? answer:",
                 "--json", "-n", "6"]) == 0
    gen = _json(capsys)
    assert gen["backend"] == "llama" and 0 < len(gen["tokens"]) <= 6
    assert {"entropy", "top1_prob", "margin", "text"} <= set(gen["tokens"][0])

    # human output: the answer on stdout, the summary on stderr
    assert main(["run", str(out), "--prompt", "the red circle is", "-n", "4"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and "tok/s" in cap.err


def test_exit_codes(tiny_models, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    assert main(["inspect", str(bad)]) == 3
    assert "FormatError" in capsys.readouterr().err
    # an impossible tolerance makes validation fail: exit 3 and no file
    out = tmp_path / "strict.gguf"
    assert main(["export", str(tiny_models["llama"]), "-o", str(out), "--quant", "q8_0",
                 "--tolerance", "1e-9"]) == 3
    assert not out.exists()
    assert "disagrees with torch" in capsys.readouterr().err
    assert main(["export", str(tiny_models["llama"]), "-o", str(out), "--quant", "q3"]) == 2
    assert main(["run"]) == 2  # click usage error


def test_missing_backend_exit_code(exports):
    path = str(exports("llama", "gguf", "f32").path)
    code = textwrap.dedent(
        f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "llama_cpp":
                    raise ImportError("not installed")
        sys.meta_path.insert(0, _Block())
        from cdcca_edge.cli import main
        sys.exit(main(["run", {path!r}, "-p", "hi"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4
    assert "cdcca-edge[llama]" in proc.stderr


def test_demo(tmp_path, monkeypatch, capsys):
    from tests.converters.test_export import torch_greedy, torch_rank

    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--json"]) == 0
    report = _json(capsys)
    assert set(report["answers"]) == {"llama", "onnx"}
    for ans in report["answers"].values():
        assert ans["tokens"] and all("entropy" in t for t in ans["tokens"])
    assert all(e["validation"]["passed"] for e in report["exports"].values())
    # the f32 ONNX answer is torch's greedy answer; the q8_0 one stays within torch's top 3
    model_dir = Path(report["model_dir"])
    onnx_ans, llama_ans = report["answers"]["onnx"], report["answers"]["llama"]
    assert [t["token"] for t in onnx_ans["tokens"]] == torch_greedy(model_dir, report["prompt"], 16)
    assert torch_rank(model_dir, llama_ans["prompt_tokens"], [t["token"] for t in llama_ans["tokens"]]) <= 2
    assert (tmp_path / "cache" / "demo" / "tiny-q8_0.gguf").is_file()
