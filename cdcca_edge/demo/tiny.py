"""Tiny Hugging Face models built offline, for the demo, the tests and the benchmarks.

No model hub is reachable, so every model the project needs besides SmolLM2 is built here
from a config, with a byte-level BPE tokenizer trained by ``tokenizers`` on an embedded,
procedurally generated corpus about coloured shapes (the domain of the demo). A few hundred
optimiser steps make the model's next-token distributions peaked like a real model's,
which matters for parity checks: a random model's near-uniform logits make greedy
decoding hinge on ties.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

TinyArch = Literal["llama", "qwen2"]

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COUNTS = ("one", "two", "three", "four", "five")
RELATIONS = ("left of", "right of", "above", "below")
EOS_TOKEN = "<|endoftext|>"


Domain = Literal["all", "source", "target"]

# The device's world drifts from a source domain (some colours, shapes and phrasings) to
# a target domain (others): the student learns the first, the teacher knows both.
SOURCE_COLOURS, TARGET_COLOURS = COLOURS[:4], COLOURS[4:]
SOURCE_SHAPES, TARGET_SHAPES = SHAPES[:3], SHAPES[3:]


@dataclass(frozen=True)
class World:
    """The facts every sentence states: each shape's colour, count and position. A fixed
    world gives answers a model can learn (and a teacher can teach): the source domain's
    shapes, then the target domain's, which the source-trained student has never seen."""

    colour: dict[str, str]
    count: dict[str, str]
    position: dict[str, tuple[float, float]]

    def relation(self, a: str, b: str) -> str:
        (xa, ya), (xb, yb) = self.position[a], self.position[b]
        if abs(xa - xb) >= abs(ya - yb):
            return "left of" if xa < xb else "right of"
        return "above" if ya < yb else "below"


def plural_of(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def tiny_world(seed: int = 0) -> World:
    rng = random.Random(seed)
    colour = dict(zip(SOURCE_SHAPES, rng.sample(SOURCE_COLOURS, len(SOURCE_SHAPES))))
    colour.update(zip(TARGET_SHAPES, rng.sample(TARGET_COLOURS, len(TARGET_SHAPES))))
    count = {s: rng.choice(COUNTS) for s in SHAPES}
    position = {s: (rng.random(), rng.random()) for s in SHAPES}
    return World(colour, count, position)


def tiny_corpus(n: int = 2000, seed: int = 0, domain: Domain = "all") -> list[str]:
    """``n`` sentences and question/answer pairs stating facts of :func:`tiny_world` about
    the source domain's shapes, the target domain's, or all of them."""
    rng = random.Random(seed)
    w = tiny_world()
    shapes = {"all": SHAPES, "source": SOURCE_SHAPES, "target": TARGET_SHAPES}[domain]
    out = []
    for _ in range(n):
        s1, s2 = rng.sample(shapes, 2)
        rel = w.relation(s1, s2)
        k = COUNTS.index(w.count[s1])
        plural = plural_of(s1) if k else s1
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"the {w.colour[s1]} {s1} is {rel} the {w.colour[s2]} {s2}.")
        elif kind == 1:
            out.append(f"there {'are' if k else 'is'} {w.count[s1]} {w.colour[s1]} {plural} in the picture.")
        elif kind == 2:
            out.append(f"question: what colour is the {s1}? answer: {w.colour[s1]}.")
        elif kind == 3:
            out.append(f"question: how many {plural_of(s1)} are there? answer: {w.count[s1]}.")
        elif kind == 4:
            asked = rng.choice(RELATIONS)
            out.append(f"question: is the {s1} {asked} the {s2}? answer: {'yes' if asked == rel else 'no'}.")
        else:
            out.append(f"question: where is the {s1}? answer: {rel} the {s2}.")
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> "PreTrainedTokenizerFast":
    """A GPT-2 style byte-level BPE tokenizer, trained offline; returns a
    ``PreTrainedTokenizerFast`` (no BOS added, ``<|endoftext|>`` as BOS/EOS/PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. Widths are multiples of 32 so every quant type's blocks fit."""

    arch: TinyArch = "llama"
    hidden_size: int = 64  # model width C
    intermediate_size: int = 128  # MLP width
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # < heads: exercises GQA in every exporter
    vocab_size: int = 512  # tokenizer vocabulary (trained to this size)
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    train_steps: int = 300  # optimiser steps on the embedded corpus; 0 keeps random weights
    seed: int = 0
    domain: Domain = "all"  # which part of the corpus it is trained on


def tiny_config(spec: TinySpec, vocab_size: int) -> "PretrainedConfig":
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown tiny architecture {spec.arch!r}; expected 'llama' or 'qwen2'")


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Build (and briefly train) a tiny causal LM and save it with its tokenizer.

    Deterministic for a given ``spec``: same seed, same weights. Every tiny model gets the
    same tokenizer. Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed)
    texts = tiny_corpus(seed=spec.seed, domain=spec.domain)
    # One tokenizer for every tiny model (trained on the whole corpus, fixed seed), so that
    # teachers and students share a vocabulary, as logit distillation needs.
    tokenizer = train_tokenizer(tiny_corpus(seed=0), spec.vocab_size)
    config = tiny_config(spec, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.train_steps:
        _train(model, tokenizer, texts, spec)
    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out_dir


def _train(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", texts: list[str],
           spec: TinySpec, seq_len: int = 48) -> None:
    import torch

    # One long token stream of sentences separated by EOS, cut into fixed windows.
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t + " ")["input_ids"] + [eos])
    data = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)  # (N, T)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=spec.train_steps)
    model.train()
    for _ in range(spec.train_steps):
        idx = torch.randint(0, data.shape[0], (16,), generator=gen)
        batch = data[idx]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def tiny_model_dir(spec: TinySpec = TinySpec(), on_stage: Callable[[str], None] | None = None) -> Path:
    """The tiny text model for ``spec``, built on first use and cached (by its spec) under
    the cache directory; benchmarks and examples share it."""
    import hashlib

    from cdcca_edge.core.paths import build_cached, cache_dir

    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"tiny-{spec.arch}-{key}"
    if on_stage and not (target / "config.json").is_file():
        on_stage(f"training the tiny {spec.arch} model (first run only)")
    return build_cached(target, lambda d: build_tiny_model(d, spec))


# The text pair the tests, `cloud` examples and `demo --text-models` share: a teacher that
# knows every domain and a smaller student trained on the source domain only.
TEXT_TEACHER = TinySpec(arch="llama", hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, domain="all", seed=5, train_steps=400)
TEXT_STUDENT = TinySpec(arch="llama", domain="source", seed=6, train_steps=300)


def text_prompts(domain: Domain, n: int, seed: int) -> list[str]:
    """``n`` prompts of the embedded corpus's ``domain`` (each sentence cut before its
    answer), for calibrating and exercising the tiny text models."""
    out = []
    for s in tiny_corpus(n, seed=seed, domain=domain):
        out.append(s.split("answer:")[0] + "answer:" if "answer:" in s else " ".join(s.split()[:4]))
    return out


def text_pair(out_dir: str | Path, on_stage: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the tiny text teacher and student (HF directories), the student exported to
    GGUF q8_0 (what `cdcca-edge cloud create-cohort` takes), and two input files: 30
    in-distribution prompts (``source.jsonl``, for `uplink calibrate`) and 60 drifted ones
    (``target.jsonl``, for `uplink collect`) into ``out_dir``."""
    import shutil

    from cdcca_edge.converters.export import export

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in (("teacher", TEXT_TEACHER), ("student", TEXT_STUDENT)):
        if on_stage:
            on_stage(f"the {name}")
        shutil.copytree(tiny_model_dir(spec, on_stage), out / name, dirs_exist_ok=True)
        paths[name] = out / name
    if on_stage:
        on_stage("exporting the student to GGUF q8_0")
    paths["artifact"] = export(paths["student"], out / "student.gguf", "gguf", quant="q8_0").path
    for name, domain, n, seed in (("source", "source", 30, 30), ("target", "target", 60, 31)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"id": f"{name[0]}{i}", "prompt": p}) + "\n"
                                       for i, p in enumerate(text_prompts(domain, n, seed))))  # type: ignore[arg-type]
    return paths
