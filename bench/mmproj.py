"""The demo's LLaVA student (and teacher) on llama.cpp's own multimodal stack: language GGUF +
mmproj GGUF on mtmd, against torch and against our bundle (ONNX vision part + the same
language GGUF): image-embedding error in clip.cpp's token order, greedy answers equal to
torch's, answer accuracy, and image-question latency.

    python bench/mmproj.py [--images 200] [--models student,teacher,siglip-student] \
        [--mtmd-cli PATH/llama-mtmd-cli] [--llama-server PATH/llama-server] [--cli-images 40]

"siglip-student" is the demo student's shape with its own SigLIP tower (no CLS), which
clip.cpp runs token for token as HF does (docs/formats/mmproj.md); built on first use.

Writes bench/results/mmproj.json and the "mmproj" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from dataclasses import replace
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="scene questions, over source + drifted domains")
    ap.add_argument("--models", default="student,teacher,siglip-student")
    ap.add_argument("--mtmd-cli", type=Path, help="a stock llama-mtmd-cli binary (llama.cpp's tools/mtmd): also "
                    "answer the first --cli-images questions with it, one process each")
    ap.add_argument("--llama-server", type=Path, help="a stock llama-server binary: also answer the first "
                    "--cli-images questions through its /completion endpoint (prompt + base64 image)")
    ap.add_argument("--cli-images", type=int, default=40)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from cdcca_edge.converters.export import export
    from cdcca_edge.converters.llava_export import torch_greedy
    from cdcca_edge.converters.mmproj import clip_order
    from cdcca_edge.demo.loop import models
    from cdcca_edge.demo.scenes import DOMAINS, dataset
    from cdcca_edge.runtime.base import GenerationConfig
    from cdcca_edge.runtime.mtmd import MtmdModel
    from cdcca_edge.runtime.multimodal import MultimodalModel

    from cdcca_edge.core.paths import build_cached
    from cdcca_edge.demo.loop import STUDENT, TEACHER, spec_key
    from cdcca_edge.demo.tiny_llava import build_tiny_llava

    teacher, student = models(False, lambda m: print(m, file=sys.stderr))
    work = cache_dir() / "bench" / "mmproj"
    # the student's shape and training, with its own SigLIP tower pretrained as the
    # teacher's CLIP tower is (same steps and images)
    sig_spec = replace(STUDENT, vision_tower="siglip", vision_pretrain_steps=TEACHER.vision_pretrain_steps,
                       vision_pretrain_images=TEACHER.vision_pretrain_images)
    sources = {"student": student, "teacher": teacher,
               "siglip-student": lambda: build_cached(work / f"siglip-student-{spec_key(sig_spec)}",
                                                      lambda d: build_tiny_llava(d, sig_spec))}
    rows = []
    examples = dataset(args.images, seed=123, domains=tuple(DOMAINS))
    cfg = GenerationConfig(max_tokens=6)
    for name in args.models.split(","):
        src = sources[name]() if callable(sources[name]) else sources[name]
        llava = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(src)
        for dtype in ("f32", "f16"):
            res = export(src, work / f"{name}-{dtype}", "gguf", quant=dtype, mmproj=work / f"{name}-mmproj-{dtype}.gguf",
                         mmproj_dtype=dtype)
            bundle = res.path
            eq_torch = eq_bundle = right_mtmd = right_torch = eq_cli = n_cli = eq_srv = n_srv = 0
            worst, t_mtmd, t_bundle = 0.0, [], []
            server = (StockServer(args.llama_server, bundle / "language.gguf", work / f"{name}-mmproj-{dtype}.gguf")
                      if args.llama_server else contextlib.nullcontext())
            with MtmdModel(bundle / "language.gguf", work / f"{name}-mmproj-{dtype}.gguf") as m, \
                    MultimodalModel(bundle) as b, server as srv:
                mean, std = b.info.image_mean, b.info.image_std
                for ex in examples:
                    prompt = b.prompt(ex.question.text)
                    t0 = time.perf_counter()
                    got = m.generate(prompt, cfg, image=ex.image)
                    t_mtmd.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    ref_b = b.generate(prompt, cfg, image=ex.image)
                    t_bundle.append(time.perf_counter() - t0)
                    ref_t = torch_greedy(llava, tok, prompt, ex.image, list(mean), list(std), 6)
                    eq_torch += list(got.tokens) == ref_t
                    eq_bundle += got.tokens == ref_b.tokens
                    words = got.text.replace(".", " ").split()
                    right_mtmd += bool(words) and words[0] == ex.question.answer
                    if args.mtmd_cli and n_cli < args.cli_images:
                        n_cli += 1
                        eq_cli += stock_cli(args.mtmd_cli, bundle / "language.gguf",
                                            work / f"{name}-mmproj-{dtype}.gguf", ex.image, prompt,
                                            6) == tok.decode([t for t in ref_t if t != tok.eos_token_id]).strip()
                    if srv is not None and n_srv < args.cli_images:
                        n_srv += 1
                        eq_srv += srv.complete(prompt, ex.image, 6) == tok.decode(
                            [t for t in ref_t if t != tok.eos_token_id])
                    words_t = tok.decode(ref_t).replace(".", " ").split()
                    right_torch += bool(words_t) and words_t[0] == ex.question.answer
                    if len(t_mtmd) <= 20:  # embedding error on the first 20 images
                        x = torch.from_numpy(b.preprocess(ex.image))
                        with torch.no_grad():
                            h = llava.model.vision_tower(x, output_hidden_states=True).hidden_states[
                                llava.config.vision_feature_layer][0]
                            tower = res.extra["mmproj"]["tower"]
                            n = int(llava.config.image_seq_length)
                            want = llava.model.multi_modal_projector(h[torch.tensor(clip_order(n, tower))]).numpy()
                        worst = max(worst, float(np.abs(m.vision.encode(ex.image) - want).max() / want.std()))
            n = len(examples)
            rows.append({"model": name, "tower": res.extra["mmproj"]["tower"], "dtype": dtype, "images": n, "embedding_diff_over_std": worst,
                         "answers_equal_torch": eq_torch / n, "answers_equal_bundle": eq_bundle / n,
                         "accuracy_mtmd": right_mtmd / n, "accuracy_torch": right_torch / n,
                         "seconds_per_question_mtmd": statistics.median(t_mtmd),
                         "seconds_per_question_bundle": statistics.median(t_bundle),
                         "mmproj_bytes": (work / f"{name}-mmproj-{dtype}.gguf").stat().st_size,
                         "export_validation": res.extra["mmproj"]["validation"],
                         **({"stock_cli_equal_torch": eq_cli / n_cli, "stock_cli_images": n_cli} if n_cli else {}),
                         **({"stock_server_equal_torch": eq_srv / n_srv, "stock_server_images": n_srv}
                            if n_srv else {})})
            print(rows[-1], file=sys.stderr)
    doc = {"machine": machine(), "rows": rows}
    cli_rows = [r for r in rows if "stock_cli_images" in r]
    cli_md = "" if not cli_rows else (
        "\nStock `llama-mtmd-cli` (built from the llama.cpp that llama-cpp-python 0.3.36 vendors; "
        "`--jinja --chat-template \"{{ messages[0]['content'] }}\" --temp 0 -n 6`, the prompt as is, "
        "one process per question, a run whose asynchronous log was lost at exit run again): its answer "
        "text equals torch's on "
        + "; ".join(f"{r['model']} {r['dtype']} {r['stock_cli_equal_torch']:.1%} of {r['stock_cli_images']}"
                    for r in cli_rows) + ".\n")
    srv_rows = [r for r in rows if "stock_server_images" in r]
    if srv_rows:
        cli_md += ("\nStock `llama-server -m language.gguf --mmproj mmproj.gguf` (same build), one server per "
                   "row on the loopback interface, `POST /completion` with `{prompt_string, multimodal_data: "
                   "[base64 PNG]}` (the image token replaced by the server's `media_marker` from `/props`), `temperature 0`, `n_predict 6`: its answer text equals torch's on "
                   + "; ".join(f"{r['model']} {r['dtype']} {r['stock_server_equal_torch']:.1%} of "
                               f"{r['stock_server_images']}" for r in srv_rows) + ".\n")
    path = write_results("mmproj", doc)
    table = "\n".join(
        f"| {r['model']} | {r['tower']} | {r['dtype']} | {r['mmproj_bytes'] / 1e3:.0f} | {r['embedding_diff_over_std']:.4f} | "
        f"{r['answers_equal_torch']:.1%} | {r['answers_equal_bundle']:.1%} | {r['accuracy_mtmd']:.1%} / "
        f"{r['accuracy_torch']:.1%} | {r['seconds_per_question_mtmd'] * 1e3:.1f} / "
        f"{r['seconds_per_question_bundle'] * 1e3:.1f} |" for r in rows)
    md = f"""## llama.cpp-native multimodal: language GGUF + mmproj on mtmd (`bench/mmproj.py`)

The demo's LLaVA student and teacher (CLIP towers), and the student's shape with its own
SigLIP tower, exported with `--mmproj` (docs/formats/mmproj.md), run by `MtmdModel`
(clip.cpp encodes the image, our llama backend answers), on {rows[0]['images']} scene
questions over every domain. Embedding error: clip.cpp's image embeddings against torch's
in clip.cpp's token order, max |diff| / std over 20 images. With a CLIP tower, clip.cpp's
LLaVA graph hands the language model [patch 1 .. N-1, CLS] where HF's hands
[patch 0 .. N-1], so answers may differ from torch where the first patch or the CLS
matters; a SigLIP tower has no CLS, and clip.cpp hands on HF's own tokens. Latency:
median seconds per question (image encode + 6 greedy tokens), mtmd / our bundle (ONNX
vision part).

| model | tower | dtype | mmproj KB | embedding diff / std | answers = torch | answers = bundle | accuracy mtmd / torch | ms per question mtmd / bundle |
|---|---|---|---:|---:|---:|---:|---:|---:|
{table}
{cli_md}"""
    update_section("mmproj", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


class StockServer:
    """llama.cpp's own ``llama-server`` with an mmproj, on a free loopback port, for one
    pair; :meth:`complete` answers an image question through ``POST /completion``."""

    def __init__(self, binary: Path, language: Path, mmproj: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.cmd = [str(binary), "-m", str(language), "--mmproj", str(mmproj), "--host", "127.0.0.1",
                    "--port", str(self.port), "-np", "1", "--no-webui"]

    def __enter__(self) -> "StockServer":
        import json
        import subprocess
        import urllib.request

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):  # up to 60 s to load
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        # the server's media marker is its own (random) string: /props says which
                        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/props", timeout=10) as p:
                            self.marker = json.loads(p.read())["media_marker"]
                        return self
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"llama-server did not come up: {' '.join(self.cmd)}")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def complete(self, prompt: str, image: Any, n: int) -> str:
        import base64
        import io
        import json
        import urllib.request

        from PIL import Image

        from cdcca_edge.core.bundle import IMAGE_TOKEN

        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        body = {"prompt": {"prompt_string": prompt.replace(IMAGE_TOKEN, self.marker),
                           "multimodal_data": [base64.b64encode(png.getvalue()).decode()]},
                "n_predict": n, "temperature": 0, "cache_prompt": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["content"]


def stock_cli(binary: Path, language: Path, mmproj: Path, image: Any, prompt: str, n: int) -> str:
    """The answer text of llama.cpp's own ``llama-mtmd-cli`` on one image question: the
    prompt passed whole through a pass-through chat template, ``<image>`` as mtmd's marker."""
    import subprocess
    import tempfile

    from PIL import Image

    from cdcca_edge.core.bundle import IMAGE_TOKEN

    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "image.png"
        Image.fromarray(image).save(png)
        for _ in range(3):
            out = subprocess.run([str(binary), "-m", str(language), "--mmproj", str(mmproj), "--image", str(png),
                                  "-p", prompt.replace(IMAGE_TOKEN, "<__media__>"), "--jinja", "--chat-template",
                                  "{{ messages[0]['content'] }}", "--temp", "0", "-n", str(n)],
                                 capture_output=True, check=True, timeout=120)
            # the CLI prints the answer through llama.cpp's asynchronous log, which can
            # lose it at exit (exit 0, empty stdout): an empty answer is asked again (an
            # answer that really is empty stays so, three times)
            if out.stdout.strip():
                break
    return out.stdout.decode("utf-8", "replace").strip()


if __name__ == "__main__":
    main()
