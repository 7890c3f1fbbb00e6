"""ONNX with weight-only int4 / int8 MatMul (onnxruntime's MatMulNBits, what
onnxruntime-genai ships): exported by onnxruntime's own quantiser, validated, run by our
onnxruntime backend, and patched in place by exact block replacement."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.converters.export import export  # noqa: E402
from cdcca_edge.converters.validate import TOLERANCES  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from cdcca_edge.core.errors import UsageError  # noqa: E402
from cdcca_edge.runtime import load  # noqa: E402
from cdcca_edge.runtime.base import GenerationConfig  # noqa: E402
from tests.cloud.test_dwc import make_lora  # noqa: E402
from tests.conftest import ARCHS  # noqa: E402
from tests.converters.test_export import PROMPTS, torch_rank  # noqa: E402
from tests.hostile import hostile  # noqa: E402


@pytest.fixture(scope="module")
def nbits(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("nbits")
    cache = {}

    def get(arch, quant):
        if (arch, quant) not in cache:
            cache[arch, quant] = export(tiny_models[arch], root / f"{arch}-{quant}", "onnx", quant=quant)
        return cache[arch, quant]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_nbits_export_runs_on_onnxruntime(arch, quant, nbits, tiny_models):
    result = nbits(arch, quant)
    v = result.validation
    assert v.passed and v.normalized_diff <= TOLERANCES[("onnx", quant)]
    art = open_artifact(result.path)
    assert compute_identity(art).digest == result.identity == art.metadata["cdcca.export_identity"]
    assert art.metadata["cdcca.quant"] == quant
    suffix = "_Q4" if quant == "int4" else "_Q8"
    packed = {t.name: t for t in art.tensors if t.name.endswith(suffix)}
    # every linear layer of the blocks and the LM head: 7 per layer (+ the untied head)
    assert len(packed) == 2 * 7 + (arch == "llama"), sorted(packed)
    assert all(t.type_name == "U8" for t in packed.values())
    assert all(f"{n.removesuffix(suffix)}_scales" in {t.name for t in art.tensors} for n in packed)
    graph = onnx.load(str(result.path / "model.onnx"), load_external_data=False).graph
    ops = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(ops) == len(packed)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ops[0].attribute}
    assert attrs["block_size"] == 32 and attrs["bits"] == int(quant[3:]) and attrs["accuracy_level"] == 4
    with load(result.path) as model:
        assert model.name == "onnx"
        for prompt in PROMPTS:
            gen = model.generate(prompt, GenerationConfig(max_tokens=12))
            assert torch_rank(tiny_models[arch], gen.prompt_tokens, gen.tokens) <= 2, prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_nbits_diff_delta_and_patch(arch, nbits, tiny_models, tmp_path):
    """The packed int4 codes and their scales patched in place: the device's int4 export
    becomes the fresh int4 export of the updated model, byte for byte."""
    base = nbits(arch, "int4").path
    lora = make_lora(tiny_models[arch], tmp_path / "lora", seed=5)
    target = export(tiny_models[arch], tmp_path / "target", "onnx", quant="int4", adapter=lora)
    device = tmp_path / "device"
    shutil.copytree(base, device)
    assert main(["delta", "diff", str(base), str(target.path), "-o", str(tmp_path / "d.cdcd")]) == 0
    assert main(["patch", str(device), str(tmp_path / "d.cdcd")]) == 0
    assert compute_identity(open_artifact(device)).digest == target.identity
    assert (device / "model.onnx_data").read_bytes() == (target.path / "model.onnx_data").read_bytes()
    with load(device) as model, load(target.path) as fresh:
        assert model.generate(PROMPTS[0], GenerationConfig(max_tokens=8)).tokens == \
            fresh.generate(PROMPTS[0], GenerationConfig(max_tokens=8)).tokens


def test_nbits_options_and_refusals(tiny_models, nbits, tmp_path, capsys):
    hostile("cli", 5)  # four bad exports, a budget for a MatMulNBits mirror
    out = tmp_path / "m"
    assert main(["export", str(tiny_models["qwen2"]), "--format", "onnx", "--quant", "int4", "--block-size", "64",
                 "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quant"] == "int4" and doc["validation"]["passed"]
    node = next(n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
                if n.op_type == "MatMulNBits")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["block_size"] == 64
    for bad in (["--quant", "int4", "--block-size", "48"], ["--quant", "int4", "--accuracy-level", "7"],
                ["--quant", "q4_k_m"], ["--quant", "int3"]):
        dest = tmp_path / "bad"
        assert main(["export", str(tiny_models["qwen2"]), "--format", "onnx", *bad, "-o", str(dest)]) == 2, bad
        assert not dest.exists()
        capsys.readouterr()
    # DWC on MatMulNBits weights: the whole update only (no byte budget yet)
    from cdcca_edge.cloud.dwc import DWCConfig, make_delta

    lora = make_lora(tiny_models["llama"], tmp_path / "lora", seed=6)
    with pytest.raises(UsageError, match="budget"):
        make_delta(nbits("llama", "int4").path, lora, tmp_path / "d.cdcd", target_base=tiny_models["llama"],
                   config=DWCConfig(budget_bytes=4096))
    assert not (tmp_path / "d.cdcd").exists()


@pytest.mark.parametrize("arch,quant", [("llama", "int4"), ("qwen2", "int8")])
def test_dwc_on_a_nbits_mirror(arch, quant, nbits, tiny_models, tmp_path):
    """DWC re-quantises the updated weights with onnxruntime's quantiser in the cloud and
    sends the changed code bytes and scales: the device ends byte-exact with the advanced
    mirror, and with a fresh export of the updated model; the update arrives."""
    from cdcca_edge.cloud.dwc import make_delta
    from tests.cloud.test_dwc import PROBE

    mirror, device = tmp_path / "mirror", tmp_path / "device"
    shutil.copytree(nbits(arch, quant).path, mirror)
    shutil.copytree(mirror, device)
    lora = make_lora(tiny_models[arch], tmp_path / "lora", seed=8)
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=tiny_models[arch], probe=PROBE,
                     advance_mirror=True)
    assert rep.probe_kl < 0.5 * rep.probe_kl_before and rep.update_left < 1.0
    assert main(["patch", str(device), str(tmp_path / "d.cdcd")]) == 0
    fresh = export(tiny_models[arch], tmp_path / "fresh", "onnx", quant=quant, adapter=lora, validate=False)
    assert compute_identity(open_artifact(device)).digest == compute_identity(open_artifact(mirror)).digest \
        == rep.target_identity == fresh.identity
