"""The command line: results on stdout, exit codes by error class (docs/cli.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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


def test_patch_commands(tmp_path, capsys):
    """delta keygen / diff --sign-key / inspect, then patch with --dry-run, --pubkey,
    --undo-out, and the exit codes of refused deltas."""
    from tests.core.delta_helpers import file_digest, make_gguf

    old = make_gguf(tmp_path / "old.gguf", seed=0)
    new = tmp_path / "new.gguf"
    new.write_bytes(old.read_bytes())
    raw = bytearray(new.read_bytes())
    raw[-100] ^= 0xFF  # change a byte of the last tensor
    new.write_bytes(bytes(raw))
    assert main(["delta", "keygen", "-o", str(tmp_path / "k.pem")]) == 0
    assert main(["delta", "keygen", "-o", str(tmp_path / "k.pem")]) == 2  # never overwrites
    capsys.readouterr()
    assert main(["delta", "diff", str(old), str(new), "-o", str(tmp_path / "d.cdcd"),
                 "--sign-key", str(tmp_path / "k.pem"), "--json"]) == 0
    made = _json(capsys)
    assert made["signed"] and made["records"] == 1
    assert main(["delta", "inspect", str(tmp_path / "d.cdcd"), "--json"]) == 0
    info = _json(capsys)
    assert info["signed_by"] and info["records"][0]["encoding"] == "replace"

    before = file_digest(old)
    assert main(["patch", str(old), str(tmp_path / "d.cdcd"), "--dry-run", "--json"]) == 0
    assert _json(capsys)["dry_run"] and file_digest(old) == before
    # a key we do not trust: refused, exit 3, nothing written
    (tmp_path / "k2.pem").unlink(missing_ok=True)
    assert main(["delta", "keygen", "-o", str(tmp_path / "k2.pem")]) == 0
    assert main(["patch", str(old), str(tmp_path / "d.cdcd"), "--pubkey", str(tmp_path / "k2.pem.pub")]) == 3
    assert "not trusted" in capsys.readouterr().err and file_digest(old) == before
    # tampered: exit 3
    bad = bytearray((tmp_path / "d.cdcd").read_bytes())
    bad[len(bad) // 2] ^= 0x01
    (tmp_path / "bad.cdcd").write_bytes(bytes(bad))
    assert main(["patch", str(old), str(tmp_path / "bad.cdcd")]) == 3
    assert file_digest(old) == before
    # the real thing, with an undo delta
    assert main(["patch", str(old), str(tmp_path / "d.cdcd"), "--pubkey", str(tmp_path / "k.pem.pub"),
                 "--undo-out", str(tmp_path / "undo.cdcd"), "--json"]) == 0
    assert _json(capsys)["applied"] and file_digest(old) == file_digest(new)
    # going back needs saying so (docs/formats/delta.md, 6.3: versions only move forward)
    assert main(["patch", str(old), str(tmp_path / "undo.cdcd")]) == 3
    assert "--allow-downgrade" in capsys.readouterr().err
    assert main(["patch", str(old), str(tmp_path / "undo.cdcd"), "--allow-downgrade"]) == 0
    assert "patched 1 records" in capsys.readouterr().out
    assert file_digest(old) == before
    assert main(["patch", "--recover", str(old), "--json"]) == 0
    assert _json(capsys)["recovered"] is None
    assert main(["patch", str(old)]) == 2  # no delta given
    assert main(["patch", str(old), str(tmp_path / "missing.cdcd")]) == 2


def test_uplink_commands(exports, tmp_path, capsys):
    from tests.runtime.test_uts import OOD, in_dist, write_jsonl

    art = str(exports("llama", "gguf", "q8_0").path)
    write_jsonl(tmp_path / "cal.jsonl", in_dist(30, seed=2), "c")
    write_jsonl(tmp_path / "in.jsonl", in_dist(10, seed=9) + OOD, "i")
    assert main(["uplink", "calibrate", art, "--inputs", str(tmp_path / "cal.jsonl"), "--rate", "0.1",
                 "-o", str(tmp_path / "calib.json"), "-n", "8", "--json"]) == 0
    cal = _json(capsys)
    assert cal["score"] == "surprise" and cal["n_samples"] == 30
    assert main(["uplink", "collect", art, "--inputs", str(tmp_path / "in.jsonl"), "--calib",
                 str(tmp_path / "calib.json"), "-o", str(tmp_path / "b.cdcu"), "--json"]) == 0
    rep = _json(capsys)
    assert rep["n_seen"] == 18 and rep["n_uploaded"] >= 1 and rep["calibration_matches"]
    assert main(["uplink", "inspect", str(tmp_path / "b.cdcu"), "--json"]) == 0
    info = _json(capsys)
    assert len(info["samples"]) == rep["n_uploaded"]
    # human output names sizes; broken inputs exit 3
    assert main(["uplink", "collect", art, "--inputs", str(tmp_path / "in.jsonl"), "--calib",
                 str(tmp_path / "calib.json"), "-o", str(tmp_path / "b2.cdcu")]) == 0
    assert "raw input bytes" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["uplink", "collect", art, "--inputs", str(tmp_path / "bad.jsonl"), "--calib",
                 str(tmp_path / "calib.json"), "-o", str(tmp_path / "b3.cdcu")]) == 3
    (tmp_path / "b.cdcu").write_bytes((tmp_path / "b.cdcu").read_bytes()[:-1])
    assert main(["uplink", "inspect", str(tmp_path / "b.cdcu")]) == 3


def test_os_errors_exit_2(tmp_path, capsys, monkeypatch):
    """An OSError reaching main is an environment problem: exit 2 with its message, never
    'unexpected error' (docs/cli.md, exit codes)."""
    import errno
    import os

    from cdcca_edge.cli import exit_code_for
    from cdcca_edge.core import artifact
    from cdcca_edge.core.errors import StorageError

    for code in (errno.EROFS, errno.EFBIG, errno.ENOSPC, errno.EACCES, errno.EIO, errno.ENAMETOOLONG,
                 errno.ELOOP, errno.EMFILE):
        exc = OSError(code, os.strerror(code), "x")
        assert exit_code_for(exc) == 2, errno.errorcode[code]
    assert exit_code_for(PermissionError(errno.EACCES, "denied")) == 2
    assert exit_code_for(StorageError("disk full")) == 2
    assert exit_code_for(RuntimeError("bug")) == 1

    def efbig(path):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))

    monkeypatch.setattr(artifact, "open_artifact", efbig)
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "File too large" in err and "unexpected" not in err
