"""HF (Llama / Qwen2) -> GGUF, written with gguf-py.

Tensor names come from gguf-py's own ``TensorNameMap`` (the table llama.cpp's converter
uses), quantisation from ``gguf.quants``, block sizes from ``GGML_QUANT_SIZES``. Matrices
take the requested type; 1-D tensors (norms, biases) stay F32 as llama.cpp expects.

The K-quant mixes (``LLAMA_QUANTS``: q4_k_m and kin) are llama.cpp's own recipes, which
choose a type per tensor; they are written by llama.cpp itself: an F32 export, then
``llama_model_quantize`` (llama-cpp-python), then the header is written again with the
identity of the quantised tensors (their bytes are copied as llama.cpp wrote them).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdcca_edge import __version__
from cdcca_edge.core import artifact as art
from cdcca_edge.core.errors import FormatError, UsageError

# CLI quant name -> (GGML tensor type for matrices, general.file_type). Resolved lazily so
# importing this module does not need gguf.
# llama.cpp's quantisation mixes, by their llama-quantize names (lower case); written by
# llama.cpp's quantiser from an F32 export
LLAMA_QUANTS = ("q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0", *LLAMA_QUANTS)


def _quant_table() -> dict[str, tuple[Any, Any]]:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    return {
        "f32": (T.F32, F.ALL_F32),
        "f16": (T.F16, F.MOSTLY_F16),
        "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
        "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
    }


def _gguf_arch(arch: str):
    from gguf import MODEL_ARCH

    return {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}[arch]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half rotary layout to GGML's
    interleaved one (llama arch only). (rows, cols) -> (rows, cols)."""
    rows, cols = w.shape
    return (
        w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    rows, cols = w.shape
    return (
        w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


@functools.lru_cache(maxsize=8)
def _name_map(gguf_arch: Any, n_layers: int) -> Any:
    """gguf-py's name map for an architecture (building one takes ~13 ms: once per model,
    not once per tensor)."""
    from gguf import get_tensor_name_map

    return get_tensor_name_map(gguf_arch, n_layers)


def hf_to_gguf_name(arch: str, n_layers: int, hf_name: str) -> str:
    """Map an HF parameter name to the GGUF tensor name llama.cpp expects.

    Raises:
        FormatError: the parameter has no slot in the GGUF architecture.
    """
    name = _name_map(_gguf_arch(arch), n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise FormatError(
            f"HF parameter {hf_name!r} has no tensor slot in the GGUF {arch} architecture; "
            "the exporter supports standard Llama/Qwen2 checkpoints"
        )
    return name


def hf_tensor_transform(arch: str, config: Any, hf_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The array transform applied to ``hf_name`` on its way into GGUF (identity or the
    q/k row permutation). The DWC delta builder maps updates through the same function."""
    if arch == "llama" and hf_name.endswith("q_proj.weight"):
        return lambda w: permute_qk(w, config.num_attention_heads)
    if arch == "llama" and hf_name.endswith("k_proj.weight"):
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return lambda w: permute_qk(w, n_kv)
    return lambda w: w


def tensor_type(quant: str, gguf_name: str, shape: tuple[int, ...]) -> Any:
    """The GGML type a tensor is stored in for a given export ``quant``.

    1-D tensors (norms, biases) stay F32, as llama.cpp expects. At q4_0 the token
    embedding and output matrices are kept at Q8_0, like llama.cpp's own quantiser keeps
    the output layer at a higher precision: on SmolLM2-135M (tied embeddings) this lifts
    top-1 agreement with torch
    on the validation prompts from 44% to 58% (first measurement, docs/export.md). A row length the block size does not divide
    falls back to F16, as llama.cpp's converter does.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    qtype = _quant_table()[quant][0]
    if quant == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return T.F16
    return qtype


def _tokenizer_pre(tokenizer_json: dict) -> str:
    """Name llama.cpp's pre-tokenizer that matches the HF one (tokenizer.ggml.pre).

    Recognised by structure; export validation then checks that both tokenise the
    validation prompts identically, so a wrong guess cannot pass silently.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if types and types[-1] == "ByteLevel" and "Split" in types:
            regex = str(parts[types.index("Split")].get("pattern", {}).get("Regex", ""))
            if r"\p{N}{1,3}" in regex:
                return "llama-bpe"
            if r"\p{N}" in regex and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex:
                return "qwen2"
    raise FormatError(
        f"unrecognised tokenizer pre-tokenizer {json.dumps(pre)[:200]}; supported: GPT-2 "
        "byte-level, SmolLM, Llama-3 and Qwen2 BPE"
    )


def _tokenizer_json(model_dir: Path) -> dict:
    from cdcca_edge.converters.hf import read_model_json

    path = model_dir / "tokenizer.json"
    tok_json = read_model_json(model_dir, "tokenizer.json", "GGUF export needs a fast (BPE) tokenizer")
    if tok_json.get("model", {}).get("type") != "BPE":
        raise FormatError(f"{path}: tokenizer model is not BPE; only byte-level BPE "
                          "tokenizers are supported for GGUF export")
    return tok_json


def _add_tokenizer(writer: Any, model_dir: Path, tok_json: dict, tokenizer: Any, n_vocab: int) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = {t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values()}
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in special or (tok in added and tok.startswith("<")):
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    # Whether BOS is prepended must match what the HF tokenizer does by default.
    probe = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    special_vocab.add_special_token["bos"] = adds_bos
    special_vocab.add_to_gguf(writer, quiet=True)


def write_gguf(
    loaded: Any, out_path: str | Path, quant: str, progress: Callable[[int, int], None] | None = None
) -> str:
    """Write ``loaded`` (a :class:`~cdcca_edge.converters.hf.LoadedModel`) as GGUF.

    Returns the identity digest of the written tensors (also stored in the file's
    ``cdcca.export_identity``).
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise UsageError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    if quant in LLAMA_QUANTS:
        return _write_llama_quant(loaded, Path(out_path), quant, progress)
    qtype, ftype = _quant_table()[quant]
    model, arch = loaded.model, loaded.arch
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise FormatError("GGUF export needs head_dim * num_attention_heads == hidden_size")

    # Refuse what we cannot write before spending time on the tensors.
    _check_rope_scaling(cfg)
    tok_json = _tokenizer_json(loaded.source_dir)
    _tokenizer_pre(tok_json)

    # Convert every tensor first: the identity goes into the header, before the data.
    entries: list[tuple[str, np.ndarray, Any]] = []
    sd = model.state_dict()
    names = [n for n in sd if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    for i, hf_name in enumerate(names):
        w = sd[hf_name].detach().float().cpu().numpy()
        w = hf_tensor_transform(arch, cfg, hf_name)(w)
        name = hf_to_gguf_name(arch, n_layers, hf_name)
        ttype = tensor_type(quant, name, w.shape)
        if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = w.astype(np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16)
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), ttype)
        entries.append((name, data, ttype))
        if progress is not None:
            progress(i + 1, len(names))

    identity = art.identity_digest(
        (name, ttype.name, _logical_shape(data, ttype), art.bytes_digest(data))
        for name, data, ttype in entries
    )

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[_gguf_arch(arch)])
    writer.add_name(loaded.source_dir.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(ftype)
    _add_tokenizer(writer, loaded.source_dir, tok_json, loaded.tokenizer, cfg.vocab_size)
    writer.add_string(art.META_VERSION, __version__)
    writer.add_string(art.META_SOURCE_DIGEST, loaded.source_digest)
    writer.add_string(art.META_QUANT, quant)
    writer.add_string(art.META_ARCH, arch)
    writer.add_string(art.META_EXPORT_IDENTITY, identity)
    for name, data, ttype in entries:
        writer.add_tensor(name, data, raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return identity


def _write_llama_quant(loaded: Any, out: Path, quant: str, progress: Callable[[int, int], None] | None) -> str:
    """``quant`` (one of LLAMA_QUANTS) as llama.cpp's quantiser writes it; the identity of
    its tensors goes into the header."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory(prefix=".cdcca-quant.", dir=out.parent) as tmp:
        f32, quantised = Path(tmp) / "f32.gguf", Path(tmp) / "quantised.gguf"
        write_gguf(loaded, f32, "f32", progress)
        llama_quantize(f32, quantised, quant)
        f32.unlink()
        identity = art.compute_identity(art.open_artifact(quantised)).digest
        reader = gguf.GGUFReader(quantised)
        arch = str(reader.fields["general.architecture"].contents())
        writer = gguf.GGUFWriter(str(out), arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in (
                    "general.architecture", art.META_QUANT, art.META_EXPORT_IDENTITY):
                continue
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_string(art.META_QUANT, quant)
        writer.add_string(art.META_EXPORT_IDENTITY, identity)
        for t in reader.tensors:  # as llama.cpp wrote them
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        del reader
    return identity


def llama_quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """``src`` (a GGUF) -> ``dst`` in llama.cpp's ``quant`` mix, by llama.cpp's quantiser.

    Raises:
        BackendUnavailableError: llama-cpp-python is not installed.
        FormatError: llama.cpp refused the file.
    """
    import ctypes
    import logging
    import os
    import tempfile

    from cdcca_edge.core.errors import BackendUnavailableError

    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailableError(f"--quant {quant} is written by llama.cpp's quantiser: install "
                                      "llama-cpp-python (`pip install 'cdcca-edge[llama]'`)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = threads or (os.cpu_count() or 1)
    # llama.cpp writes a line or two per tensor to stderr (fd 2, partly past its log
    # callback): kept aside, and shown only when it fails
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.setLevel(level)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise FormatError(f"llama.cpp's quantiser refused {src} for {quant} (code {rc}): {tail}")


def _logical_shape(data: np.ndarray, ttype: Any) -> tuple[int, ...]:
    import gguf

    if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return tuple(data.shape)
    return tuple(gguf.quant_shape_from_byte_shape(data.shape, ttype))


def _check_rope_scaling(cfg: Any) -> None:
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise FormatError(
            f"rope_scaling {scaling!r} is not supported by the GGUF exporter yet; export to "
            "ONNX instead"
        )
