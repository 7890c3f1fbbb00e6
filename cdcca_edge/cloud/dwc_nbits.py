"""DWC for ONNX exports with weight-only int4 / int8 MatMul (``MatMulNBits``).

A ``MatMulNBits`` weight ``W`` (N, K) is stored as ``W_Q4`` (or ``W_Q8``): uint8 codes
(N, K / block, block x bits / 8; int4 codes two a byte, low nibble first) and
``W_scales`` (N, K / block) float32, symmetric: ``W[n, k] = (code - 2^(bits-1)) x
scale[n, k // block]``. The device never re-quantises them (onnxruntime's quantiser is C++
float code, like llama.cpp's: docs/formats/delta.md 5.5), so the cloud quantises the
target with onnxruntime's own quantiser (the exporter's, ``DefaultWeightOnlyQuantizer``),
and the delta replaces exactly the code bytes and scales that changed, plus the changed
elements of float32 initializers (norms, the embedding), found by comparing the mirror
with that quantised target: ``delta diff`` between the mirror and what a fresh export of
the target would hold. There is no byte budget here yet: the whole update goes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdcca_edge.core.artifact import read_tensor
from cdcca_edge.core.errors import IntegrityError, MissingTensorError, UsageError, require

NBITS_QUANTS = ("int4", "int8")


def is_nbits(art: Any) -> bool:
    return art.format == "onnx" and art.metadata.get("cdcca.quant", "f32") in NBITS_QUANTS


def nbits_weights(model_path: Path) -> dict[str, dict[str, Any]]:
    """HF weight name -> its MatMulNBits node's layout (codes and scales initializer names,
    N, K, bits, block), from the graph (not the weights)."""
    onnx = require("onnx", "export")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        codes, scales = node.input[1], node.input[2]
        if len(node.input) > 3 and node.input[3]:
            raise UsageError(f"{model_path}: {node.name} has zero points (asymmetric); cdcca-edge exports "
                             "symmetric MatMulNBits only")
        hf = codes.rsplit("_Q", 1)[0]
        out[hf] = {"codes": codes, "scales": scales, "N": a["N"], "K": a["K"], "bits": a["bits"],
                   "block": a["block_size"]}
    return out


def nbits_quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """HF weight (N, K) -> (codes (N, K / block, block x bits / 8) uint8, scales (N, K /
    block) float32), by onnxruntime's own quantiser, as the exporter ran it."""
    q = require("onnxruntime.quantization.matmul_nbits_quantizer", "export")
    cfg = q.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    codes, scales, _ = q.DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(
        np.ascontiguousarray(w.T, dtype=np.float32))  # MatMul's B is (K, N)
    return codes, scales


def nbits_dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """(N, K / block, blob) uint8 codes and (N, K / block) scales -> W (N, K) float32."""
    n, kb, blob = codes.shape
    if bits == 4:
        q = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n, kb, blob * 2)
    else:
        q = codes
    vals = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(n, kb, 1).astype(np.float32)
    return vals.reshape(n, -1)[:, :k]


def quantised_target(art: Any, target: Path, target_base: Path | None) -> tuple[Path, dict[str, float], Any]:
    """A temporary copy of the mirror's directory holding the target as a fresh export
    would: MatMulNBits weights quantised by onnxruntime, float32 initializers as they are.
    Returns (its directory, the weight errors {before, after, update_left}, the target
    model). The caller removes the directory.

    Raises:
        MissingTensorError: a changed parameter has no place in the mirror.
    """
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    from cdcca_edge.converters.hf import merge_adapter

    base_dir = Path(target_base) if target_base is not None else Path(target)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if target_base is not None:
        model = merge_adapter(model, Path(target))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    changed = [k for k in sd if not np.array_equal(sd[k], base_sd[k])] if target_base is not None else list(sd)
    layout = nbits_weights(art.path)
    plain = {t.name: t for t in art.tensors}
    tmp = Path(tempfile.mkdtemp(prefix=".cdcca-nbits-target.", dir=art.root.parent))
    shutil.copytree(art.root, tmp, dirs_exist_ok=True)
    data = tmp / art.tensors[0].file.name
    err_now = err_before = upd = 0.0
    touched, total = 0, sum(v.size for v in sd.values())
    try:
        with open(data, "r+b") as f:
            for hf in changed:
                w = sd[hf]
                if hf in layout:
                    lay = layout[hf]
                    codes_t, scales_t = plain[lay["codes"]], plain[lay["scales"]]
                    codes, scales = nbits_quantize(w, lay["bits"], lay["block"])
                    if codes.nbytes != codes_t.nbytes or scales.nbytes != scales_t.nbytes:
                        raise IntegrityError(f"{hf}: onnxruntime's quantiser gives another layout than the "
                                             "mirror's: export both with the same onnxruntime")
                    old = nbits_dequantize(np.frombuffer(read_tensor(codes_t), np.uint8).reshape(codes.shape),
                                           np.frombuffer(read_tensor(scales_t), np.float32), lay["bits"], lay["K"])
                    new = nbits_dequantize(codes, scales, lay["bits"], lay["K"])
                    for t, arr in ((codes_t, codes), (scales_t, scales)):
                        f.seek(t.offset)
                        f.write(np.ascontiguousarray(arr).tobytes())
                elif hf in plain and plain[hf].type_name == "F32":
                    t = plain[hf]
                    old = np.frombuffer(read_tensor(t), np.float32).reshape(w.shape) if t.nbytes == w.nbytes else None
                    if old is None:
                        raise MissingTensorError(f"{hf}: the mirror's {hf} is not {w.shape} float32")
                    new = w
                    f.seek(t.offset)
                    f.write(np.ascontiguousarray(w, np.float32).tobytes())
                else:
                    raise MissingTensorError(f"HF parameter {hf!r} has no tensor in {art.path} (neither float32 "
                                             "nor a MatMulNBits weight): the artefact cannot hold this update")
                touched += w.size
                err_before += float(((old - w) ** 2).sum())
                err_now += float(((new - w) ** 2).sum())
                upd += float((w ** 2).sum())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    norm = max(upd, 1e-30) ** 0.5
    return tmp, {"relative_error_before": err_before ** 0.5 / norm, "relative_error": err_now ** 0.5 / norm,
                 "update_left": (err_now / max(err_before, 1e-30)) ** 0.5, "touched": touched / total}, model


def make_nbits_delta(art: Any, target: Path, out: Path, target_base: Path | None, probe: Sequence[str] | None,
                     sign_key: Any | None, say: Callable[[str], None], advance_mirror: bool) -> Any:
    """:func:`cdcca_edge.cloud.dwc.make_delta` for a MatMulNBits mirror (already checked
    and restored by it). Returns a DWCReport."""
    from cdcca_edge.cloud.dwc import DWCReport, probe_kl, restore_interrupted_trial, target_logits, trial_undo_path
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.delta_build import diff_artifacts
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.state import current_identity
    from cdcca_edge.core.trust import Trust

    mirror = art.root
    say("quantising the target with onnxruntime's MatMulNBits quantiser")
    tmp, err, model = quantised_target(art, target, target_base)
    try:
        ref = ids = None
        if probe:
            say("target logits on the probe prompts")
            ref, ids = target_logits(Path(target), target_base, probe, model=model)
        del model
        kl_before = probe_kl(mirror, ref, ids) if ref is not None else None
        summary = diff_artifacts(mirror, tmp, out, sign_key=sign_key)  # versions: the mirror's, + 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say("advancing the mirror" if advance_mirror else "measuring the patched model")
    undo = trial_undo_path(mirror)
    try:
        apply_delta(mirror, out, trust=Trust.none(), undo_out=undo)
        kl = probe_kl(mirror, ref, ids) if ref is not None else None
    finally:
        if not advance_mirror:
            restore_interrupted_trial(mirror)
    undo.unlink(missing_ok=True)
    now = current_identity(open_artifact(mirror))[0]
    if advance_mirror and now != summary.target_identity:
        raise IntegrityError(f"{mirror}: after advancing, the mirror's identity is {now[:16]}, "
                             f"not the delta's target {summary.target_identity[:16]}")
    return DWCReport(
        delta=str(out), bytes=out.stat().st_size, artifact_bytes=art.tensor_bytes, records=summary.records,
        records_by_encoding={"replace": summary.records}, weights_touched=err["touched"],
        relative_error=err["relative_error"], update_left=err["update_left"],
        relative_error_before=err["relative_error_before"], probe_kl=kl, probe_kl_before=kl_before,
        budget_bytes=None, base_identity=summary.base_identity, target_identity=summary.target_identity,
        from_version=summary.from_version, to_version=summary.to_version, signed=summary.signed,
        mirror_advanced=advance_mirror)
