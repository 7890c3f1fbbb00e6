"""Bundles: a manifest directory of GGUF and ONNX parts is one artefact — one identity over
every file, and one delta patching several files at once."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.cli import main
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.bundle import MANIFEST_NAME
from cdcca_edge.core.delta_build import DeltaBuilder
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.patch import apply_delta
from cdcca_edge.core.trust import Trust
from tests.core.delta_helpers import file_digest, make_gguf, make_onnx
from tests.core.hostile_fs import HOSTILE_PATHS, LONG_NAME, add_traps, no_hang
from tests.hostile import hostile


def make_bundle(root, seed=0):
    root.mkdir()
    make_gguf(root / "language.gguf", seed=seed)
    make_onnx(root / "vision", seed=seed)
    (root / MANIFEST_NAME).write_text(json.dumps({
        "format": "cdcca-artifact", "version": 1,
        "parts": [{"name": "vision", "path": "vision"}, {"name": "language", "path": "language.gguf"}],
    }))
    return root


def test_bundle_tensors_and_identity(tmp_path):
    b = make_bundle(tmp_path / "b")
    art = open_artifact(b)
    assert art.format == "bundle"
    names = {t.name for t in art.tensors}
    assert {"vision/w32", "vision/w16", "language/Q8_0.w"} <= names
    assert {art.file_key(f) for f in art.files} == {"language.gguf", "vision/model.onnx_data"}
    before = compute_identity(art).digest
    # a byte in either part changes the one identity
    for part_file, tensor in (("language.gguf", "language/F32.w"), ("vision/model.onnx_data", "vision/w32")):
        t = open_artifact(b).tensor(tensor)
        raw = bytearray(t.file.read_bytes())
        raw[t.offset] ^= 1
        t.file.write_bytes(bytes(raw))
        assert compute_identity(open_artifact(b)).digest != before
        raw[t.offset] ^= 1
        t.file.write_bytes(bytes(raw))
    assert compute_identity(open_artifact(b)).digest == before


def test_one_delta_patches_both_parts(tmp_path):
    b = make_bundle(tmp_path / "b")
    original = {p: file_digest(b / p) for p in ("language.gguf", "vision")}
    builder = DeltaBuilder(b)
    builder.replace_units("language/Q8_0.w", [3], [1], bytes(34))
    builder.add_quantized("vision/w16", [(0, 2)], [0.01, 0.02], np.ones(64, np.int8), bits=8)
    s = builder.write(tmp_path / "d.cdcd")
    assert {r.file for r in __import__("cdcca_edge.core.delta_format", fromlist=["x"]).read_delta(s.path).header.records} == {
        "language.gguf", "vision/model.onnx_data"}
    apply_delta(b, tmp_path / "d.cdcd", undo_out=tmp_path / "undo.cdcd", trust=Trust.none())
    assert compute_identity(open_artifact(b)).digest == s.target_identity
    assert all(file_digest(b / p) != d for p, d in original.items())
    apply_delta(b, tmp_path / "undo.cdcd", trust=Trust.none(), allow_downgrade=True)
    assert all(file_digest(b / p) == d for p, d in original.items())


@pytest.mark.parametrize("manifest,message", [
    ({"format": "x", "version": 1, "parts": []}, "not a cdcca-artifact manifest"),
    ({"format": "cdcca-artifact", "version": 1, "parts": []}, "no parts"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a/b", "path": "language.gguf"}]}, "part name"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "../x.gguf"}]}, "outside the bundle"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "language.gguf"},
                                                          {"name": "a", "path": "vision"}]}, "duplicate part"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "nothing.gguf"}]}, "missing"),
])
def test_bad_manifest(tmp_path, manifest, message):
    hostile("manifest")
    b = make_bundle(tmp_path / "b")
    (b / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=message):
        open_artifact(b)


def test_manifest_not_json(tmp_path):
    hostile("manifest")
    b = make_bundle(tmp_path / "b")
    (b / MANIFEST_NAME).write_text("{nope")
    with pytest.raises(FormatError, match="not valid JSON"):
        open_artifact(b)
    shutil.rmtree(b)


# --- hostile manifests (docs/formats/artifact.md section 6) ---------------------------
# Every case must end in FormatError (exit 3 through the CLI) or, for the few manifests
# that are valid, in an artefact whose files all lie inside the bundle: never another
# exception, never a hang on a FIFO, never a file opened outside the bundle.





@pytest.fixture(scope="module")
def trap_bundle(tmp_path_factory):
    """A valid bundle plus every trap a manifest could point a part at."""
    top = tmp_path_factory.mktemp("hostile-bundle")
    outside = top / "outside"
    outside.mkdir()
    make_gguf(outside / "other.gguf", seed=3, rows=2)
    make_onnx(outside / "onnx", seed=3, rows=2, cols=32)
    b = top / "b"
    b.mkdir()
    make_gguf(b / "language.gguf", seed=0, rows=2)
    make_onnx(b / "vision", seed=0, rows=2, cols=32)
    add_traps(b, outside / "other.gguf")
    (b / "notmodel.bin").write_bytes(b"not a model at all")
    nested = b / "nested"
    nested.mkdir()
    make_gguf(nested / "x.gguf", seed=1, rows=2)
    (nested / MANIFEST_NAME).write_text(json.dumps(
        {"format": "cdcca-artifact", "version": 1, "parts": [{"name": "x", "path": "x.gguf"}]}))
    os.symlink("vision", b / "vision_alias")  # a link to a part inside the bundle
    os.symlink(outside / "onnx", b / "vision_out")  # a link to an ONNX directory outside
    (b / "evil").mkdir()  # a directory whose model.onnx is a link to a model outside
    os.symlink(outside / "onnx" / "model.onnx", b / "evil" / "model.onnx")
    return b


def _write_manifest(b, doc) -> None:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode("utf-8", "surrogatepass")
    (b / MANIFEST_NAME).write_bytes(raw)


def _check_bundle_contract(b, art) -> None:
    """What a patcher relies on when a manifest is accepted."""
    root = b.resolve()
    assert art.format == "bundle"
    for f in art.files:
        assert root in f.parents and f.resolve() == f
        assert stat.S_ISREG(os.lstat(f).st_mode)
        key = art.file_key(f)
        assert art.file_for_key(key) == f
    for t in art.tensors:
        assert "/" in t.name and t.offset + t.nbytes <= t.file.stat().st_size


def _open_hostile(b):
    """open_artifact on the bundle: the artefact, or None after a FormatError."""
    with no_hang():
        try:
            art = open_artifact(b)
        except FormatError as exc:
            assert str(exc)  # a message that names the problem
            return None
    _check_bundle_contract(b, art)
    return art


def _doc(parts, **extra):
    return {"format": "cdcca-artifact", "version": 1, "parts": parts, **extra}


def _one(path, name="a"):
    return _doc([{"name": name, "path": path}])


HOSTILE_MANIFESTS = [
    # (id, manifest (dict or raw bytes), message the FormatError must contain)
    ("deep-list", b"[" * 100_000 + b"]" * 100_000, "nested"),
    ("deep-object", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested"),
    ("deep-parts", b'{"format": "cdcca-artifact", "version": 1, "parts": ' + b"[" * 50_000
     + b"]" * 50_000 + b"}", "nested"),
    ("huge-int-version", b'{"format": "cdcca-artifact", "version": ' + b"9" * 5000 + b', "parts": []}',
     "JSON"),
    ("huge-int-anywhere", b'{"x": ' + b"1" * 10_000 + b"}", "JSON"),
    ("not-utf8", b'{"format": "cdcca-artifact\xff", "version": 1}', "JSON"),
    ("utf16", json.dumps(_one("language.gguf")).encode("utf-16"), "JSON"),
    ("empty", b"", "JSON"),
    ("top-level-list", b"[]", "not a cdcca-artifact manifest"),
    ("top-level-string", b'"cdcca-artifact"', "not a cdcca-artifact manifest"),
    ("version-true", {"format": "cdcca-artifact", "version": True,
                      "parts": [{"name": "a", "path": "language.gguf"}]}, "version"),
    ("version-float", {"format": "cdcca-artifact", "version": 1.0,
                       "parts": [{"name": "a", "path": "language.gguf"}]}, "version"),
    ("version-string", {"format": "cdcca-artifact", "version": "1", "parts": []}, "version"),
    ("parts-missing", {"format": "cdcca-artifact", "version": 1}, "no parts"),
    ("parts-dict", _doc({"name": "a", "path": "language.gguf"}), "no parts"),
    ("parts-string", _doc("language.gguf"), "no parts"),
    ("part-string", _doc(["language.gguf"]), "part"),
    ("part-list", _doc([["a", "language.gguf"]]), "part"),
    ("part-null", _doc([None]), "part"),
    ("name-int", _doc([{"name": 1, "path": "language.gguf"}]), "part name"),
    ("name-list", _doc([{"name": ["a"], "path": "language.gguf"}]), "part name"),
    ("name-missing", _doc([{"path": "language.gguf"}]), "part name"),
    ("name-newline", _one("language.gguf", name="a\n"), "part name"),
    ("name-upper", _one("language.gguf", name="A"), "part name"),
    ("name-slash", _one("language.gguf", name="a/b"), "part name"),
    ("name-empty", _one("language.gguf", name=""), "part name"),
    ("name-dup", _doc([{"name": "a", "path": "language.gguf"}, {"name": "a", "path": "vision"}]),
     "duplicate part"),
    ("path-int", _one(5), "has no path"),
    ("path-list", _one(["language.gguf"]), "has no path"),
    ("path-null", _one(None), "has no path"),
    ("path-empty", _one(""), "has no path"),
    ("path-dot", _one("."), "names the bundle itself"),
    ("path-traversal", _one("../outside/other.gguf"), "outside the bundle"),
    ("path-traversal-deep", _one("vision/../../outside/other.gguf"), "outside the bundle"),
    ("path-absolute-outside", _one("/etc/passwd"), "absolute"),
    ("path-absolute-inside", None, "absolute"),  # filled in by the test: root/language.gguf
    ("path-nul", _one("lang\0uage.gguf"), "path"),
    ("path-too-long", _one(LONG_NAME), "path"),
    ("path-loop", _one("loop"), "symbolic link"),
    ("path-link-out", _one("link_out"), "symbolic link"),
    ("path-link-inside", _one("vision_alias"), "symbolic link"),
    ("path-link-dir-out", _one("vision_out"), "symbolic link"),
    ("path-dangling", _one("dangling"), "symbolic link"),
    ("path-missing", _one("nothing.gguf"), "missing"),
    ("path-fifo", _one("fifo"), "not a regular file or directory"),
    ("path-empty-dir", _one("emptydir"), "has no model.onnx"),
    ("path-not-a-model", _one("notmodel.bin"), "neither a GGUF file"),
    ("path-data-file", _one("vision/model.onnx_data"), "neither a GGUF file"),
    ("nested-bundle-dir", _one("nested"), "itself a bundle"),
    ("nested-bundle-manifest", _one("nested/" + MANIFEST_NAME), "itself a bundle"),
    ("self-manifest", _one(MANIFEST_NAME), "itself a bundle"),
    ("model-link-out", _one("evil"), "outside the bundle"),
    ("same-file-twice", _doc([{"name": "a", "path": "language.gguf"},
                              {"name": "b", "path": "./language.gguf"}]), "overlap"),
    ("same-onnx-twice", _doc([{"name": "a", "path": "vision"},
                              {"name": "b", "path": "vision/model.onnx"}]), "overlap"),
]


@pytest.mark.parametrize("case,manifest,message", HOSTILE_MANIFESTS, ids=[c[0] for c in HOSTILE_MANIFESTS])
def test_hostile_manifest_table(trap_bundle, case, manifest, message):
    hostile("manifest")
    if case == "path-absolute-inside":
        manifest = _one(str(trap_bundle.resolve() / "language.gguf"))
    _write_manifest(trap_bundle, manifest)
    with no_hang(), pytest.raises(FormatError, match=message):
        open_artifact(trap_bundle)


@pytest.mark.parametrize("case,manifest,message", HOSTILE_MANIFESTS[::6],
                         ids=[c[0] for c in HOSTILE_MANIFESTS[::6]])
def test_hostile_manifest_cli_exit_3(trap_bundle, capsys, case, manifest, message):
    hostile("manifest")
    if case == "path-absolute-inside":
        manifest = _one(str(trap_bundle.resolve() / "language.gguf"))
    _write_manifest(trap_bundle, manifest)
    with no_hang():
        assert main(["inspect", "--no-identity", str(trap_bundle)]) == 3
    err = capsys.readouterr().err
    assert "FormatError" in err and MANIFEST_NAME in err


def test_valid_manifest_still_opens(trap_bundle):
    _write_manifest(trap_bundle, _doc([{"name": "vision", "path": "vision"},
                                       {"name": "language", "path": "language.gguf"}]))
    art = _open_hostile(trap_bundle)
    assert art is not None and {f.name for f in art.files} == {"language.gguf", "model.onnx_data"}


# Strategies: JSON of every shape, and manifests that are right except where they are not.
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["cdcca-artifact", "language.gguf", "vision", "a"]),
)
_json = st.recursive(_json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)), max_leaves=8)
_good_paths = ["language.gguf", "vision", "vision/model.onnx", "./language.gguf", "vision/",
               "vision/../language.gguf"]
_trap_paths = ["fifo", "emptydir", "loop", "link_out", "dangling", "nested", "notmodel.bin",
               "nested/" + MANIFEST_NAME, MANIFEST_NAME, "vision/model.onnx_data", "vision_alias",
               "vision_out", "evil", "missing.gguf", "../outside/other.gguf", "../outside/onnx"]
_bad_names = st.one_of(st.sampled_from(["A", "a/b", "a\n", "", " a", "é", "../a", "a" * 300]),
                       st.text(max_size=6), _json)


def _mostly(draw, good, bad, n: int = 10):
    """``good`` except about once in ``n`` draws: each fault is rare, so most manifests
    get past the first checks to the parts and the files they name."""
    return draw(bad) if draw(st.integers(0, n - 1)) == 0 else draw(good)


@st.composite
def _part(draw):
    if draw(st.integers(0, 19)) == 0:
        return draw(_json)  # a part that is not an object at all
    part = {}
    if draw(st.integers(0, 19)):
        part["name"] = _mostly(draw, st.sampled_from(["vision", "language", "a", "b", "x_1", "lang-2"]),
                               _bad_names)
    if draw(st.integers(0, 19)):
        part["path"] = draw(st.one_of(
            st.sampled_from(_good_paths), st.sampled_from(_good_paths), st.sampled_from(_trap_paths),
            st.sampled_from(HOSTILE_PATHS) if draw(st.booleans()) else st.text(max_size=12) | _json))
    if draw(st.integers(0, 4)) == 0:
        part.update(draw(st.dictionaries(st.text(max_size=4), _json, max_size=2)))
    return part


@st.composite
def _manifest(draw):
    doc = {}
    if draw(st.integers(0, 29)):
        doc["format"] = _mostly(draw, st.just("cdcca-artifact"), _json_scalars)
    if draw(st.integers(0, 29)):
        doc["version"] = _mostly(draw, st.just(1), st.sampled_from([1.0, True, "1", 2, 0, -1, 10**30])
                                 | _json_scalars)
    if draw(st.integers(0, 29)):
        doc["parts"] = _mostly(draw, st.lists(_part(), min_size=1, max_size=3), _json)
    if draw(st.integers(0, 3)) == 0:
        doc["provenance"] = _mostly(draw, st.dictionaries(
            st.sampled_from(["cdcca.version", "cdcca.quant", "x"]), _json_scalars, max_size=2), _json)
    if draw(st.integers(0, 5)) == 0:
        doc["multimodal"] = draw(_json)
    return doc


@st.composite
def _manifest_bytes(draw):
    kind = draw(st.integers(0, 19))
    doc = draw(_manifest())
    if kind == 0:  # deep nesting somewhere in an otherwise valid document
        depth = draw(st.sampled_from([50, 500, 5_000, 50_000]))
        open_, close = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = open_ * depth + (b"1" if open_ != b"[" else b"") + close * depth
        return json.dumps(doc).encode()[:-1] + b', "deep": ' + inner + b"}" if doc else inner
    if kind == 1:  # numbers past every limit
        return json.dumps(doc).encode()[:-1] + b', "n": ' + b"7" * draw(st.integers(4000, 20000)) + b"}"
    if kind == 2:  # arbitrary bytes, or a valid manifest with bytes flipped or cut
        raw = bytearray(json.dumps(_one("language.gguf")).encode())
        if draw(st.booleans()):
            return draw(st.binary(max_size=64))
        i = draw(st.integers(0, len(raw) - 1))
        if draw(st.booleans()):
            return bytes(raw[:i])
        raw[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == 3:  # another encoding, or a BOM
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b""])) + json.dumps(doc).encode(
            draw(st.sampled_from(["utf-8", "utf-16-le", "latin-1"])), "surrogatepass"
            if doc else "strict")
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@settings(max_examples=1200)
@given(raw=_manifest_bytes())
def test_hostile_manifest_generated(trap_bundle, raw):
    hostile("manifest")
    _write_manifest(trap_bundle, raw)
    _open_hostile(trap_bundle)


@settings(max_examples=150)
@given(doc=st.lists(st.fixed_dictionaries({"name": st.sampled_from(["vision", "language", "a", "b"]),
                                           "path": st.sampled_from(_good_paths + _trap_paths)}),
                    min_size=1, max_size=3))
def test_hostile_parts_generated(trap_bundle, doc):
    """Well-typed manifests whose parts mix real parts and traps: open, or FormatError."""
    hostile("manifest")
    _write_manifest(trap_bundle, _doc(doc))
    art = _open_hostile(trap_bundle)
    if art is not None:
        paths = [p["path"] for p in doc]
        assert not set(paths) & set(_trap_paths)


@settings(max_examples=100)
@given(raw=_manifest_bytes())
def test_hostile_manifest_cli(trap_bundle, capsys, raw):
    """Through the CLI: exit 0 or 3, never 1 or 2."""
    hostile("manifest")
    _write_manifest(trap_bundle, raw)
    with no_hang():
        code = main(["inspect", "--no-identity", "--json", str(trap_bundle)])
    err = capsys.readouterr().err
    assert code in (0, 3), err
    if code == 3:
        assert "FormatError" in err


GOOD_MM = {"kind": "llava", "image_token_id": 5, "image_seq_length": 4, "image_size": 32,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "vision_feature_dim": 8,
           "hidden_size": 16, "prompt_template": "<image>\nquestion: {question} answer:"}
BAD_MM = {
    "not an object": (["llava"], "multimodal section is not"),
    "other kind": ({**GOOD_MM, "kind": "blip"}, "multimodal section is not"),
    "token id a string": ({**GOOD_MM, "image_token_id": "5"}, "image_token_id"),
    "token id a bool": ({**GOOD_MM, "image_token_id": True}, "image_token_id"),
    "negative size": ({**GOOD_MM, "image_size": -1}, "image_size"),
    "huge count": ({**GOOD_MM, "image_seq_length": 1 << 40}, "image_seq_length"),
    "missing hidden size": ({k: v for k, v in GOOD_MM.items() if k != "hidden_size"}, "hidden_size"),
    "two means": ({**GOOD_MM, "image_mean": [0.5, 0.5]}, "image_mean"),
    "nan std": ({**GOOD_MM, "image_std": [0.2, float("nan"), 0.2]}, "image_std"),
    "400-digit mean": ({**GOOD_MM, "image_mean": [10**400, 0.5, 0.5]}, "image_mean"),
    "zero std": ({**GOOD_MM, "image_std": [0.2, 0.0, 0.2]}, "image_std"),
    "string mean": ({**GOOD_MM, "image_mean": ["a", "b", "c"]}, "image_mean"),
    "template without question": ({**GOOD_MM, "prompt_template": "<image> say it"}, "prompt_template"),
    "template a number": ({**GOOD_MM, "prompt_template": 7}, "prompt_template"),
}


@pytest.mark.parametrize("case", sorted(BAD_MM))
def test_bad_multimodal_section_is_a_format_error(tmp_path, case):
    """Every reader of a manifest (artefact, runtime, DWC mapping) goes through
    core.bundle.read_manifest, which checks the multimodal section before anything uses it."""
    from cdcca_edge.core.bundle import read_manifest

    b = make_bundle(tmp_path / "b")
    doc = json.loads((b / MANIFEST_NAME).read_text())
    section, message = BAD_MM[case]
    (b / MANIFEST_NAME).write_text(json.dumps({**doc, "multimodal": section}))
    hostile("manifest")
    with pytest.raises(FormatError, match=message):
        read_manifest(b)
    with pytest.raises(FormatError, match=message):
        open_artifact(b)


def test_good_multimodal_section_reads_back(tmp_path):
    from cdcca_edge.core.bundle import read_manifest

    b = make_bundle(tmp_path / "b")
    doc = json.loads((b / MANIFEST_NAME).read_text())
    (b / MANIFEST_NAME).write_text(json.dumps({**doc, "multimodal": GOOD_MM}))
    mm = read_manifest(b).multimodal
    assert mm.to_json() == GOOD_MM
    assert mm.prompt("what colour?") == "<image>\nquestion: what colour? answer:"
    assert mm.prompt("<image> as is") == "<image> as is"
