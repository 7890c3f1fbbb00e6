"""Bundle manifests (`cdcca-artifact.json`): the parts of a multi-part artefact and, for a
LLaVA bundle, what the device needs to feed it images (image token, prompt template,
image normalisation). Spec: docs/formats/artifact.md, section 6.

Every reader of a manifest (the artefact reader, the multimodal runtime, the DWC slot
mapping) goes through :func:`read_manifest`, so each check is made once.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.fileio import entry_inside, open_regular, short_repr

MANIFEST_NAME = "cdcca-artifact.json"  # a bundle: several parts, one artefact
MANIFEST_FORMAT = "cdcca-artifact"
MANIFEST_VERSION = 1
MANIFEST_MAX_BYTES = 1 << 20  # a manifest lists a few parts; refuse to read a huge file
PART_NAME = re.compile(r"^[a-z0-9_-]+$")
VISION_PART = "vision"
LANGUAGE_PART = "language"
MULTIMODAL_KIND = "llava"
IMAGE_TOKEN = "<image>"  # where a prompt's image goes
QUESTION_FIELD = "{question}"  # where a prompt template's question goes
DEFAULT_PROMPT_TEMPLATE = f"USER: {IMAGE_TOKEN}\n{QUESTION_FIELD} ASSISTANT:"  # LLaVA-1.5's


@dataclass(frozen=True)
class Multimodal:
    """A LLaVA bundle's ``multimodal`` section."""

    image_token_id: int
    image_seq_length: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    vision_feature_dim: int
    hidden_size: int
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    def prompt(self, question: str) -> str:
        """``question`` in the bundled model's prompt template; a text already holding
        the image token is kept as is."""
        if IMAGE_TOKEN in question:
            return question
        return self.prompt_template.replace(QUESTION_FIELD, question)

    def to_json(self) -> dict[str, Any]:
        return {"kind": MULTIMODAL_KIND, **{k: (list(v) if isinstance(v, tuple) else v)
                                            for k, v in self.__dict__.items()}}


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file, resolved
    parts: dict[str, Path] = field(default_factory=dict)  # name -> file or directory, in order
    provenance: dict[str, str] = field(default_factory=dict)
    multimodal: Multimodal | None = None

    @property
    def root(self) -> Path:
        return self.path.parent


def _read_json(manifest: Path) -> object:
    """The manifest's JSON document; every way it can fail is a FormatError."""
    with open_regular(manifest, f"a {MANIFEST_FORMAT} manifest") as f:
        raw = f.read(MANIFEST_MAX_BYTES + 1)
    if len(raw) > MANIFEST_MAX_BYTES:
        raise FormatError(f"{manifest}: larger than {MANIFEST_MAX_BYTES} bytes; not a "
                          f"{MANIFEST_FORMAT} manifest")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        raise FormatError(f"{manifest}: not valid JSON (nested too deeply)") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise FormatError(f"{manifest}: not valid JSON ({exc})") from exc


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a bundle manifest (the file, or the bundle directory).

    Raises:
        FormatError: not a manifest of this version; a part's name or path breaks the
            rules (section 1.1: relative, inside the bundle, no symbolic link, not itself
            a bundle); a part is missing; the multimodal section is malformed.
    """
    manifest = Path(path)
    if manifest.is_dir():
        manifest = manifest / MANIFEST_NAME
    manifest = manifest.resolve()
    root = manifest.parent
    doc = _read_json(manifest)
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{manifest}: not a {MANIFEST_FORMAT} manifest")
    version = doc.get("version")
    if type(version) is not int or version != MANIFEST_VERSION:  # not True, not 1.0
        raise FormatError(f"{manifest}: manifest version {short_repr(str(version))} is not "
                          f"supported (expected {MANIFEST_VERSION}); upgrade cdcca-edge")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise FormatError(f"{manifest}: the manifest lists no parts")
    found: dict[str, Path] = {}
    for i, part in enumerate(parts):
        name, target = _check_part(manifest, root, i, part)
        if name in found:
            raise FormatError(f"{manifest}: duplicate part name {short_repr(name)}")
        found[name] = target
    prov = doc.get("provenance", {})
    provenance = {str(k): str(v) for k, v in prov.items()} if isinstance(prov, dict) else {}
    mm = doc.get("multimodal")
    return Manifest(manifest, found, provenance, None if mm is None else _multimodal(manifest, mm))


def _check_part(manifest: Path, root: Path, i: int, part: object) -> tuple[str, Path]:
    if not isinstance(part, dict):
        raise FormatError(f"{manifest}: part #{i} is a {type(part).__name__}, expected an "
                          'object {"name": ..., "path": ...}')
    name, rel = part.get("name"), part.get("path")
    if not isinstance(name, str) or not PART_NAME.fullmatch(name):
        raise FormatError(f"{manifest}: part name {short_repr(str(name))} must match [a-z0-9_-]+")
    if not isinstance(rel, str) or not rel:
        raise FormatError(f"{manifest}: part {name!r} has no path")
    target, st = entry_inside(root, rel, f"{manifest}: part {name!r} path", "the bundle")
    if st is None:
        raise FormatError(f"{manifest}: part {name!r} is missing ({short_repr(rel)}); keep every "
                          "part inside the bundle directory")
    if stat.S_ISDIR(st.st_mode):
        nested = os.path.lexists(target / MANIFEST_NAME)
    elif stat.S_ISREG(st.st_mode):
        nested = target.name == MANIFEST_NAME
    else:
        raise FormatError(f"{manifest}: part {name!r} path {short_repr(rel)} is not a regular "
                          "file or directory")
    if nested:
        raise FormatError(f"{manifest}: part {name!r} is itself a bundle; nesting is not supported")
    return name, target


def _finite(x: object) -> bool:
    try:
        return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]
    except OverflowError:  # a 400-digit JSON integer
        return False


def _multimodal(manifest: Path, mm: object) -> Multimodal:
    def bad(why: str) -> FormatError:
        return FormatError(f"{manifest}: the multimodal section {why}; export the bundle again")

    if not isinstance(mm, dict) or mm.get("kind") != MULTIMODAL_KIND:
        raise bad(f'is not {{"kind": "{MULTIMODAL_KIND}", ...}}')
    ints = {}
    for key in ("image_token_id", "image_seq_length", "image_size", "vision_feature_dim", "hidden_size"):
        v = mm.get(key)
        if type(v) is not int or not 0 <= v < 1 << 31:
            raise bad(f"needs {key} as a non-negative integer, has {short_repr(str(v))}")
        ints[key] = v
    triples = {}
    for key in ("image_mean", "image_std"):
        v = mm.get(key)
        if (not isinstance(v, list) or len(v) != 3 or not all(_finite(x) for x in v)
                or (key == "image_std" and not all(x > 0 for x in v))):
            raise bad(f"needs {key} as three finite numbers (std > 0), has {short_repr(str(v))}")
        triples[key] = tuple(float(x) for x in v)
    template = mm.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if not isinstance(template, str) or QUESTION_FIELD not in template:
        raise bad(f"needs a prompt_template holding {QUESTION_FIELD}")
    return Multimodal(prompt_template=template, **ints, **triples)  # type: ignore[arg-type]
