"""UTS benchmark: what uncertainty scoring costs, how well each score finds shifted
inputs, and how small the uplink is.

    python bench/uts.py [--repeat 7]

Writes bench/results/uts.json and the "uts" section of docs/benchmarks.md.

1. Scoring overhead, SmolLM2-135M on both backends: decode time with per-token scoring on
   versus off (alternating, medians; target <= 3%), and prefill with prompt-position
   scores (needed by the prompt_nll/surprise scores) versus without.
2. Selection quality: area under the ROC curve of each sample score for telling
   out-of-domain prompts from in-domain ones — the tiny demo model (in-domain: its shapes
   corpus; shifted: other languages, code, noise) and SmolLM2 (in-domain: plain everyday
   English; shifted: other languages and noise — not code, which SmolLM2 was trained on).
3. Uplink size: `collect` over a stream of in- and out-of-domain inputs (10% upload rate
   calibrated in-domain): bundle bytes versus raw input bytes, and how many shifted inputs
   went up with UTS versus the random selector at the same count.
Adaptation gain from UTS- versus randomly-selected uploads needs AKD (bench/akd.py).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, smollm2_hf_dir, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

# SmolLM2's in-domain stream: plain everyday English (written for this benchmark).
ENGLISH = [
    "The farmers market opens every Saturday morning, and", "After dinner we usually take the dog for a walk around",
    "My sister is learning to play the piano because", "The train to the city was late again this morning, so",
    "When it rains in the afternoon, the children play", "She bought fresh bread and a bag of apples at",
    "The library will be closed on Monday for", "He forgot his umbrella at the office and had to",
    "Our neighbours are painting their house a bright", "The recipe says to bake the cake for forty minutes at",
    "Every summer my grandparents visit the lake where", "The new coffee shop on the corner serves",
    "I need to remember to call the dentist about", "The football match was cancelled because of",
    "They planted tomatoes and beans in the garden behind", "It takes about twenty minutes to walk from here to",
    "The teacher asked the students to write a short story about", "We watched a funny movie last night about a family that",
    "The museum has a new exhibition of paintings from", "Please turn off the lights when you leave the",
    "The bus driver smiled and told us that", "My favourite season is autumn because the leaves",
    "The hotel room had a small balcony with a view of", "Before the meeting starts, could you print",
    "The baby finally fell asleep after", "He made a cup of tea and sat down to read",
    "The shop sells second-hand books, old maps and", "On weekends the park is full of people who",
    "She wrote a letter to her best friend to say", "The soup needs a little more salt and",
    "The children were excited about the school trip to", "We should leave early to avoid the traffic on",
    "The doctor said that I should drink more water and", "It was the coldest winter anyone could remember, and",
    "The cat likes to sleep on the warm windowsill when", "My brother fixed the old bicycle so that",
    "The restaurant was so busy that we had to wait", "I am looking forward to the holidays because",
    "The weather forecast says it will be sunny until", "They moved to a smaller flat closer to",
]
SHIFTED = [
    "Der Hund läuft schnell über die Wiese und", "La voiture rouge est garée devant la",
    "Il gatto dorme sul divano mentre la", "Suomen kieli on hyvin vaikea, koska",
    "Tämä talo on hyvin vanha ja", "Ο σκύλος τρέχει γρήγορα στο", "Собака быстро бежит по",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ=", "xq zvtr plom qweer bnnmx kloo fj",
    "0x7f 0x45 0x4c 0x46 0x02 0x01 0x01 0x00", "lorem ipsum dolor sit amet consectetur adipiscing",
    "zzkq wwpl ttrx vvbn qqml ssdf",
]
TINY_SHIFTED = SHIFTED + ["def quicksort(arr):\n    if len(arr) <= 1:\n", "SELECT id FROM accounts WHERE"]


def english(n: int, seed: int) -> list[str]:
    """n in-domain prompts, drawn from ENGLISH (with repeats beyond 40)."""
    rng = random.Random(seed)
    return [rng.choice(ENGLISH) for _ in range(n)]


def auroc(neg: list[float], pos: list[float]) -> float:
    """P(score of a shifted input > score of an in-domain one), ties count half."""
    a, b = np.asarray(neg), np.asarray(pos)
    return float(((b[:, None] > a[None, :]).sum() + 0.5 * (b[:, None] == a[None, :]).sum()) / (a.size * b.size))


def score_table(model, in_prompts, out_prompts, max_tokens: int) -> dict[str, float]:
    from cdcca_edge.runtime import GenerationConfig
    from cdcca_edge.runtime.uts import SCORES, sample_uncertainty

    cfg = GenerationConfig(max_tokens=max_tokens, score_prompt=True)
    gi = [model.generate(p, cfg) for p in in_prompts]
    go = [model.generate(p, cfg) for p in out_prompts]
    return {name: auroc([sample_uncertainty(g, name) for g in gi], [sample_uncertainty(g, name) for g in go])
            for name in SCORES}


def overhead(model, prompt_ids: list[int], repeat: int, n_dec: int) -> dict[str, float]:
    import time

    from cdcca_edge.runtime import GenerationConfig

    on = GenerationConfig(max_tokens=n_dec, stop_at_eos=False)
    off = GenerationConfig(max_tokens=n_dec, stop_at_eos=False, score=False)
    dec_on, dec_off, pre_on, pre_off = [], [], [], []
    model.generate(prompt_ids, on)  # warm-up
    for r in range(repeat):
        for cfg, sink in ((on, dec_on), (off, dec_off)) if r % 2 == 0 else ((off, dec_off), (on, dec_on)):
            sink.append(model.generate(prompt_ids, cfg).decode_seconds)
        for all_rows, sink in ((True, pre_on), (False, pre_off)):
            model.reset()
            t0 = time.perf_counter()
            logits = model.forward(prompt_ids, all_logits=all_rows)
            if all_rows:
                from cdcca_edge.runtime.scores import score_logits

                score_logits(logits[:-1], prompt_ids[1:])
            sink.append(time.perf_counter() - t0)
    med = statistics.median
    return {
        "decode_seconds_scored": med(dec_on), "decode_seconds_unscored": med(dec_off),
        "decode_overhead": med(dec_on) / med(dec_off) - 1.0,
        "prefill_seconds_prompt_scored": med(pre_on), "prefill_seconds_plain": med(pre_off),
        "prefill_overhead": med(pre_on) / med(pre_off) - 1.0,
    }


def collect_case(model, identity, in_cal, in_stream, out_stream, work: Path) -> dict:
    from cdcca_edge.runtime.uts import calibrate, collect, read_inputs

    cal = calibrate(model, in_cal, identity, rate=0.1, max_tokens=16)
    path = work / "stream.jsonl"
    stream = [("in", p) for p in in_stream] + [("out", p) for p in out_stream]
    random.Random(0).shuffle(stream)
    with open(path, "w") as f:
        for i, (kind, p) in enumerate(stream):
            f.write(json.dumps({"id": f"{kind}{i}", "prompt": p}) + "\n")
    items = read_inputs(path)
    res = {}
    for selector in ("uts", "random"):
        rep = collect(model, items, cal, work / f"{selector}.cdcu", identity, selector=selector)
        res[selector] = {
            "uploaded": rep.n_uploaded, "seen": rep.n_seen,
            "shifted_uploaded": sum(i.startswith("out") for i in rep.uploaded_ids),
            "shifted_seen": len(out_stream), "bundle_bytes": rep.bundle_bytes,
            "raw_input_bytes": rep.raw_input_bytes, "uploaded_raw_bytes": rep.uploaded_raw_bytes,
            "scoring_seconds": rep.scoring_seconds, "decode_seconds": rep.decode_seconds,
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from cdcca_edge.demo.tiny import TinySpec, tiny_corpus, tiny_model_dir
    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime import load

    work = cache_dir() / "bench" / "uts"
    work.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": machine(), "repeat": args.repeat}

    # --- tiny demo model ---------------------------------------------------------------
    tiny = tiny_model_dir(TinySpec(), lambda m: print(m, file=sys.stderr))
    tiny_gguf = export(tiny, work / "tiny-q8_0.gguf", "gguf", quant="q8_0").path
    qs = [s.split("answer:")[0] + "answer:" if "answer:" in s else " ".join(s.split()[:4])
          for s in tiny_corpus(400, seed=123)]
    with load(tiny_gguf) as m:
        ident = compute_identity(open_artifact(tiny_gguf)).digest
        doc["tiny_auroc"] = score_table(m, qs[:60], TINY_SHIFTED, 12)
        doc["tiny_collect"] = collect_case(m, ident, qs[100:200], qs[200:300], TINY_SHIFTED * 2, work)

    # --- SmolLM2 ------------------------------------------------------------------------
    hf = smollm2_hf_dir()
    rt = cache_dir() / "bench" / "runtime"
    gguf = rt / "smollm2-135m-q8_0.gguf"
    onnx = rt / "smollm2-135m-onnx"
    if not gguf.exists():
        gguf = export(hf, gguf, "gguf", quant="q8_0").path
    if not (onnx / "model.onnx").exists():
        onnx = export(hf, onnx, "onnx").path
    from transformers import AutoTokenizer

    text = " ".join(ENGLISH)
    prompt_ids = AutoTokenizer.from_pretrained(hf)(text)["input_ids"][:128]
    doc["overhead"] = {}
    for name, path in (("llama", gguf), ("onnx", onnx)):
        with load(path, n_ctx=512) as m:
            doc["overhead"][name] = overhead(m, prompt_ids, args.repeat, 64)
            print(f"{name}: {doc['overhead'][name]}", file=sys.stderr)
    with load(gguf, n_ctx=512) as m:
        ident = compute_identity(open_artifact(gguf)).digest
        doc["smollm2_auroc"] = score_table(m, ENGLISH, SHIFTED, 12)
        doc["smollm2_collect"] = collect_case(m, ident, english(100, 2), english(100, 3), SHIFTED * 2, work)

    path = write_results("uts", doc)
    ov = doc["overhead"]
    names = list(doc["tiny_auroc"])
    rows = "\n".join(f"| `{n}` | {doc['tiny_auroc'][n]:.2f} | {doc['smollm2_auroc'][n]:.2f} |" for n in names)

    def coll(c):
        u, r = c["uts"], c["random"]
        return (f"{u['uploaded']}/{u['seen']} uploaded; shifted inputs among them: UTS "
                f"{u['shifted_uploaded']}/{u['shifted_seen']}, random {r['shifted_uploaded']}/{r['shifted_seen']}; "
                f"bundle {u['bundle_bytes']:,} bytes = {u['bundle_bytes'] / u['raw_input_bytes']:.1%} of "
                f"the {u['raw_input_bytes']:,} raw input bytes seen")
    md = f"""## UTS: scoring cost, selection quality, uplink size (`bench/uts.py`)

Per-token scoring (entropy, top-1, margin, the paper's T=0.1 confidence) during decoding of
64 tokens after a 128-token prompt, SmolLM2-135M, median of {args.repeat} alternating runs:

| backend | decode, scored | decode, unscored | scoring overhead | prefill with prompt scores vs plain |
|---|---:|---:|---:|---:|
| llama.cpp (q8_0) | {ov['llama']['decode_seconds_scored']:.3f} s | {ov['llama']['decode_seconds_unscored']:.3f} s | {ov['llama']['decode_overhead']:+.1%} | {ov['llama']['prefill_overhead']:+.1%} |
| onnxruntime (f32) | {ov['onnx']['decode_seconds_scored']:.3f} s | {ov['onnx']['decode_seconds_unscored']:.3f} s | {ov['onnx']['decode_overhead']:+.1%} | {ov['onnx']['prefill_overhead']:+.1%} |

Area under the ROC curve of each sample score for telling shifted prompts (other
languages, noise; code too for the tiny model) from in-domain ones (1.0 = perfect,
0.5 = chance):

| score | tiny demo model | SmolLM2-135M |
|---|---:|---:|
{rows}

`uplink collect` with 10% of in-domain samples calibrated to go up:
- tiny model: {coll(doc['tiny_collect'])};
- SmolLM2-135M: {coll(doc['smollm2_collect'])}.
"""
    update_section("uts", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
