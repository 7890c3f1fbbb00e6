"""The device path never imports torch, transformers, peft or optimum.

Checked in fresh subprocesses: once by inspecting ``sys.modules`` after import, and once
by running the device commands with those packages made unimportable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "peft", "optimum", "onnx")  # onnx: export-time only

BLOCKER = textwrap.dedent(
    f"""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"blocked on the device path: {{name}}")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_runtime_and_core_is_torch_free():
    proc = _python(
        "import sys, cdcca_edge.runtime, cdcca_edge.core.artifact, cdcca_edge.core.gguf_file, "
        "cdcca_edge.runtime.onnx_backend, cdcca_edge.runtime.llama_backend, cdcca_edge.cli, "
        "cdcca_edge.runtime.multimodal, cdcca_edge.runtime.uts\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_run_and_inspect_work_without_heavy_packages(exports, fmt):
    path = str(exports("llama", fmt, "q8_0" if fmt == "gguf" else "f32").path)
    code = BLOCKER + textwrap.dedent(
        f"""
        from cdcca_edge.cli import main
        rc1 = main(["inspect", {path!r}, "--json"])
        rc2 = main(["run", {path!r}, "--prompt", "the red circle is", "--json", "-n", "4"])
        sys.exit(rc1 * 10 + rc2)
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    docs = proc.stdout.strip().split("\n}\n")
    assert len(docs) == 2
    inspect_doc = json.loads(docs[0] + "\n}")
    assert inspect_doc["identity_matches_export"] is True
    assert json.loads(docs[1])["tokens"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_the_device_agent_serves_without_heavy_packages(exports, fmt):
    pytest.importorskip("fastapi")
    path = str(exports("llama", fmt, "q8_0" if fmt == "gguf" else "f32").path)
    code = BLOCKER + textwrap.dedent(
        f"""
        from fastapi.testclient import TestClient
        from cdcca_edge.runtime.agent import create_agent_app
        with TestClient(create_agent_app({path!r})) as c:
            r = c.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "the red"}}],
                                                     "max_tokens": 3}})
            assert r.status_code == 200, r.text
        print([m for m in {HEAVY!r} if m in sys.modules])
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("[]")
