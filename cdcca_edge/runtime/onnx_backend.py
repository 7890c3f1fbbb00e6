"""onnxruntime backend for decoder models exported with KV cache (optimum layout).

The model takes ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key/value`` and returns ``logits`` and ``present.{i}.key/value``.
The cache stays in onnxruntime-owned ``OrtValue``s between steps (I/O binding), so a decode
step copies only the new token in and its logits out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdcca_edge.core.artifact import ONNX_MODEL_NAME
from cdcca_edge.core.errors import CdccaError, FormatError, UsageError, require
from cdcca_edge.runtime.base import Backend

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxBackend(Backend):
    """An ONNX export directory (model.onnx + external data + tokenizer.json + config.json).

    Args:
        path: the directory, or its model.onnx.
        n_ctx: longest sequence to allow (default and maximum: the model's
            ``max_position_embeddings``).
        n_threads: intra-op threads (default: all cores).
    """

    name = "onnx"

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None) -> None:
        ort = require("onnxruntime", "device")
        tokenizers = require("tokenizers", "device")
        path = Path(path)
        model_path = path / ONNX_MODEL_NAME if path.is_dir() else path
        self.dir = model_path.parent
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no ONNX model here")
        tok_path = self.dir / "tokenizer.json"
        if not tok_path.is_file():
            raise FormatError(f"{self.dir}: no tokenizer.json next to the model; re-export with "
                              "`cdcca-edge export --format onnx`")
        tok_json = _read_json(tok_path)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(tok_json))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise FormatError(f"{tok_path}: not a tokenizers file ({exc})") from exc
        self._byte_level = _is_byte_level(tok_json.get("decoder"))
        self._special = {
            i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self._pieces: dict[int, bytes] = {}
        config = _read_json(self.dir / "config.json")
        gen_config = _read_json(self.dir / "generation_config.json", missing_ok=True)
        eos = gen_config.get("eos_token_id", config.get("eos_token_id"))
        self._eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        max_pos = int(config.get("max_position_embeddings", 2048))
        self._n_ctx = min(n_ctx, max_pos) if n_ctx else max_pos

        self._ort = ort
        self._ort_errors = _ort_errors(ort)
        self._model_path = model_path
        self._threads = n_threads or os.cpu_count() or 1
        self._open()

    def _open(self) -> None:
        model_path, ort = self._model_path, self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.log_severity_level = 3
        self._hold(self.dir)
        try:
            self._sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except self._ort_errors as exc:
            self._release_hold()
            raise FormatError(f"{model_path}: onnxruntime could not load the model ({exc})") from exc
        except BaseException:
            self._release_hold()
            raise
        inputs = {i.name: i for i in self._sess.get_inputs()}
        # a multimodal bundle's language part takes embeddings; text tokens are embedded
        # here with the table the export left in the external data
        self._embeds_input = "inputs_embeds" in inputs and "input_ids" not in inputs
        for required in ("input_ids" if not self._embeds_input else "inputs_embeds", "attention_mask"):
            if required not in inputs:
                raise FormatError(f"{model_path}: model has no {required!r} input; export with "
                                  "task text-generation-with-past")
        self._table = self._embedding_table(model_path) if self._embeds_input else None
        self._has_position_ids = "position_ids" in inputs
        past = [n.split(".") for n in inputs if n.startswith("past_key_values.")]
        if not past or any(len(p) != 3 or not p[1].isdigit() or p[2] not in ("key", "value")
                           for p in past):
            raise FormatError(f"{model_path}: expected inputs past_key_values.<layer>.key|value; "
                              "export with task text-generation-with-past")
        self._past_names = [".".join(p) for p in sorted(past, key=lambda p: (int(p[1]), p[2]))]
        out_names = [o.name for o in self._sess.get_outputs()]
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        missing = [n for n in ["logits", *self._present_names] if n not in out_names]
        if missing:
            raise FormatError(f"{model_path}: model lacks outputs {missing}")
        first = inputs[self._past_names[0]]
        self._kv_dtype = _ORT_FLOAT.get(first.type, np.float32)
        vocab_dim = self._sess.get_outputs()[out_names.index("logits")].shape[-1]
        dims = (first.shape[1], first.shape[3], vocab_dim)
        if not all(isinstance(d, int) for d in dims):
            raise FormatError(f"{model_path}: KV heads, head size and vocabulary must be static "
                              f"dimensions, got {dims}")
        self._kv_heads, self._head_dim, self._n_vocab = dims
        self._past: dict[str, Any] = {}
        self._n_past = 0
        self.reset()

    # --- Backend interface -----------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def artifact_path(self) -> Path:
        return self.dir

    def reload(self) -> None:
        self.close()
        self._open()

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        if not self._byte_level:
            return self._tokenizer.decode(list(tokens), skip_special_tokens=True).encode("utf-8")
        # Byte-level BPE: map each token to its raw bytes, so that a character split over
        # several tokens streams correctly (decode() would give U+FFFD for each half).
        return b"".join(self._piece(int(t)) for t in tokens)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            text = self._tokenizer.id_to_token(token) or ""
            if token in self._special:
                piece = b""  # control tokens print nothing, as in llama.cpp
            elif all(c in _UNICODE_TO_BYTE for c in text):
                piece = bytes(_UNICODE_TO_BYTE[c] for c in text)
            else:  # a non-special added token stored as plain text
                piece = text.encode("utf-8")
            self._pieces[token] = piece
        return piece

    def reset(self) -> None:
        empty = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)  # (B, H_kv, 0, D)
        value = self._ort.OrtValue.ortvalue_from_numpy(empty)
        self._past = {n: value for n in self._past_names}
        self._n_past = 0

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        tokens = self.check_tokens(tokens)  # Gather would wrap negative ids silently
        if not tokens:
            raise UsageError("forward() needs at least one token")
        if self._embeds_input:
            return self.forward_embeds(self._table[np.asarray(tokens)], all_logits)
        return self._run_model("input_ids", np.asarray(tokens, dtype=np.int64)[None, :], all_logits)

    def forward_embeds(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append positions given as input embeddings (T, hidden); needs a model that takes
        ``inputs_embeds`` (a multimodal bundle's language part)."""
        if not self._embeds_input:
            raise UsageError(f"{self.dir}: this model takes token ids, not embeddings")
        x = np.ascontiguousarray(embeds, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self._table.shape[1]:
            raise UsageError(f"embeddings of shape {x.shape}; this model takes (T, {self._table.shape[1]})")
        return self._run_model("inputs_embeds", x[None], all_logits)

    def _embedding_table(self, model_path: Path) -> np.ndarray:
        from cdcca_edge.core.artifact import open_artifact

        art = open_artifact(model_path)
        try:
            t = art.tensor("model.embed_tokens.weight")
        except CdccaError:
            raise FormatError(f"{model_path}: takes inputs_embeds but has no model.embed_tokens.weight "
                              "to embed text tokens with") from None
        dtype = {"F32": np.float32, "F16": np.float16}[t.type_name]
        table = np.fromfile(t.file, dtype=dtype, count=t.n_elements, offset=t.offset)
        return table.reshape(t.shape).astype(np.float32)  # (V, hidden)

    def _run_model(self, input_name: str, x: np.ndarray, all_logits: bool) -> np.ndarray:
        n = x.shape[1]
        total = self._n_past + n
        if total > self._n_ctx:
            raise UsageError(f"sequence of {total} tokens exceeds n_ctx={self._n_ctx}")
        mask = np.ones((1, total), dtype=np.int64)  # (1, past + T)
        binding = self._sess.io_binding()
        binding.bind_cpu_input(input_name, x)
        binding.bind_cpu_input("attention_mask", mask)
        if self._has_position_ids:
            pos = np.arange(self._n_past, total, dtype=np.int64)[None, :]  # (1, T)
            binding.bind_cpu_input("position_ids", pos)
        for name in self._past_names:
            binding.bind_ortvalue_input(name, self._past[name])
        binding.bind_output("logits")
        for name in self._present_names:
            binding.bind_output(name)
        try:
            self._sess.run_with_iobinding(binding)
        except self._ort_errors as exc:
            raise CdccaError(f"{self.dir}: onnxruntime failed to run the model ({exc})") from exc
        outs = binding.get_outputs()  # logits, then presents, in bind order
        self._past = dict(zip(self._past_names, outs[1:]))
        self._n_past = total
        logits = outs[0].numpy()[0]  # (T, V)
        return logits if all_logits else logits[-1:]

    def close(self) -> None:
        self._past = {}
        self._sess = None  # type: ignore[assignment]
        self._release_hold()


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """onnxruntime's exception classes (they derive from Exception, not a common base)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile",
             "NoModel", "NotImplemented", "RuntimeException", "EngineError")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def _gpt2_byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _gpt2_byte_table()


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", [])
    )


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if not path.is_file():
        if missing_ok:
            return {}
        raise FormatError(f"{path.parent}: no {path.name} next to the model; re-export with "
                          "`cdcca-edge export --format onnx`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
