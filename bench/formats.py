"""The GGUF formats people deploy, on SmolLM2-135M-Instruct: q8_0 and q4_0 (gguf-py) against
llama.cpp's K-quant mixes (q4_k_s, q4_k_m, q5_k_m, q6_k, written by llama.cpp's own
quantiser): file size, the tensor types each mix chose, agreement with torch (export
validation, and teacher-forced top-1 / KL on a 128-token text), and prefill / decode
speed on our llama.cpp backend against llama-cpp-python called directly on the same file.

    python bench/formats.py [--repeat 7] [--quants q8_0,q4_0,q4_k_s,q4_k_m,q5_k_m,q6_k]

Writes bench/results/formats.json and the "formats" section of docs/benchmarks.md. Speed:
ours and direct alternate repeat by repeat, medians, and the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, smollm2_hf_dir, update_section, write_results  # noqa: E402
from bench.runtime import TEXT, backend_speed, llama_direct_speed  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

QUANTS = ("q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "onnx-f32", "onnx-int8", "onnx-int4")


class OrtDirect:
    """onnxruntime called directly on an export: a plain greedy loop over the session with
    the KV cache fed back (no binding reuse, no scoring): the baseline for our backend."""

    def __init__(self, path: Path, threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.past = [n for n in ins if n.startswith("past_key_values.")]
        shape = ins[self.past[0]].shape  # (batch, heads, seq, head_dim)
        self.empty = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        self.np = np

    def run(self, ids: list[int], n_new: int) -> tuple[float, float]:
        np = self.np
        t0 = time.perf_counter()
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(len(ids), dtype=np.int64)[None], **{n: self.empty for n in self.past}}
        out = self.sess.run(None, feed)
        prefill = time.perf_counter() - t0
        n = len(ids)
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            tok = int(out[0][0, -1].argmax())
            feed = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, n + 1), np.int64),
                    "position_ids": np.array([[n]], np.int64), **dict(zip(self.past, out[1:]))}
            out = self.sess.run(None, feed)
            n += 1
        return len(ids) / prefill, (n_new - 1) / (time.perf_counter() - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.scores import kl_divergence

    hf_dir = smollm2_hf_dir()
    work = cache_dir() / "bench" / "formats"
    work.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"][: args.prompt_tokens]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    del model

    rows: dict[str, dict] = {}
    for quant in args.quants.split(","):
        onnx = quant.startswith("onnx-")
        path = work / (f"smollm2-{quant}" if onnx else f"smollm2-{quant}.gguf")
        print(f"exporting SmolLM2-135M {quant}", file=sys.stderr)
        t0 = time.perf_counter()
        res = export(hf_dir, path, "onnx" if onnx else "gguf", quant=quant.removeprefix("onnx-"),
                     tolerance=1e9)  # measured, not gated here
        seconds = time.perf_counter() - t0
        art = open_artifact(path)
        types = Counter(t.type_name for t in art.tensors if len(t.shape) >= 2)
        with load(path) as be:
            got = be.prompt_logits(ids)  # (T, V)
        rows[quant] = {
            "bytes": res.bytes, "export_seconds": seconds, "matrix_types": dict(types),
            "validation": res.validation.as_dict(),
            "text_top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "text_mean_kl": float(kl_divergence(ref, got).mean()),
        }
        print(f"  {rows[quant]['bytes']:,} B, top-1 {rows[quant]['text_top1']:.1%}, "
              f"KL {rows[quant]['text_mean_kl']:.3g}, types {dict(types)}", file=sys.stderr)

    n_dec = args.decode_tokens

    def ours(be) -> tuple[float, float]:
        return backend_speed(be, ids, n_dec)

    def direct(llm) -> tuple[float, float]:
        return llama_direct_speed(llm, ids, n_dec)

    for quant, row in rows.items():
        onnx = quant.startswith("onnx-")
        path = work / (f"smollm2-{quant}" if onnx else f"smollm2-{quant}.gguf")
        if onnx:
            ort_direct = OrtDirect(path, args.threads)
            run_direct = lambda: ort_direct.run(ids, n_dec)  # noqa: E731
            kw = {"n_threads": args.threads}
        else:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512,
                                  n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            run_direct = lambda: direct(llm)  # noqa: E731
            kw = {"n_threads": args.threads, "n_ctx": 512}
        samples: dict[str, list[tuple[float, float]]] = {"ours": [], "direct": []}
        with load(path, **kw) as be:
            ours(be), run_direct()  # warm-up
            for r in range(args.repeat):
                order = ("ours", "direct") if r % 2 == 0 else ("direct", "ours")
                for name in order:
                    samples[name].append(ours(be) if name == "ours" else run_direct())
        if not onnx:
            llm.close()
        for name, s in samples.items():
            row[name] = {"prefill_tok_s": statistics.median(x[0] for x in s),
                         "decode_tok_s": statistics.median(x[1] for x in s), "samples": s}
        row["decode_ratio_ours_over_direct"] = statistics.median(
            a[1] / b[1] for a, b in zip(samples["ours"], samples["direct"]))
        print(f"{quant}: ours decode {row['ours']['decode_tok_s']:.1f} tok/s, direct "
              f"{row['direct']['decode_tok_s']:.1f} (ratio {row['decode_ratio_ours_over_direct']:.3f})",
              file=sys.stderr)

    from bench.common import RESULTS

    earlier = RESULTS / "formats.json"
    if earlier.exists():  # formats not run now keep their earlier figures, in their order
        import json

        old = json.loads(earlier.read_text())["formats"]
        rows = {**{q: r for q, r in old.items() if q not in rows}, **rows}
        rows = {q: rows[q] for q in [*QUANTS, *rows] if q in rows}
    doc = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "prompt_tokens": len(ids),
           "decode_tokens": n_dec, "repeat": args.repeat, "machine": machine(), "formats": rows}
    path = write_results("formats", doc)
    render(doc)
    print(f"wrote {path}", file=sys.stderr)


def render(doc: dict) -> None:
    rows = doc["formats"]
    table = "\n".join(
        f"| {q} | {r['bytes'] / 1e6:.1f} | {', '.join(f'{t} {n}' for t, n in sorted(r['matrix_types'].items()))} | "
        f"{r['validation']['normalized_diff']:.2f} | {r['text_top1']:.1%} | {r['text_mean_kl']:.3f} | "
        f"{r['ours']['prefill_tok_s']:.0f} / {r['direct']['prefill_tok_s']:.0f} | "
        f"{r['ours']['decode_tok_s']:.1f} / {r['direct']['decode_tok_s']:.1f} | "
        f"{r['decode_ratio_ours_over_direct']:.3f} |"
        for q, r in rows.items())
    md = f"""## Formats: SmolLM2-135M as GGUF q8_0 / q4_0 / llama.cpp's K-quant mixes, and ONNX f32 / int8 / int4 (`bench/formats.py`)

{doc['prompt_tokens']}-token text, {doc['decode_tokens']} greedy tokens, {doc['threads']} threads, median of
{doc['repeat']} alternating runs. The K-quant mixes are written by llama.cpp's quantiser
(`llama_model_quantize`); q8_0 / q4_0 by gguf-py (q4_0 keeps the embedding at Q8_0); ONNX
int8 / int4 by onnxruntime's MatMulNBits quantiser (blocks of 32, accuracy level 4). "direct" is
llama-cpp-python's `Llama.generate` for GGUF, and a plain onnxruntime session loop with the
KV cache fed back for ONNX; "ours" is our backend, which also scores every token. The ONNX
"types" column counts initializers of 2 or more dimensions.
"/ std" is the export validation's max |logit - torch| over the logits' std (the gate of
docs/export.md); top-1 and KL are teacher-forced on the text against torch f32.

| quant | MB | matrix types | / std | top-1 | KL (nats) | prefill tok/s ours / direct | decode tok/s ours / direct | decode ratio |
|---|---:|---|---:|---:|---:|---:|---:|---:|
{table}

SmolLM2-135M is 576 wide: 576 is no multiple of 256, so llama.cpp's mixes store most of its
matrices in their fallback types (Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K) and only the
1536-wide ones (the MLP's down projection) in K types, as `llama-quantize` does for this
model.
"""
    update_section("formats", md)
    print(md)


if __name__ == "__main__":
    main()
