"""llama.cpp's K-quant mixes (Q4_K_M, Q6_K, ...): exported by llama.cpp's own quantiser,
run in llama.cpp, patched by exact super-block replacement, and updated by DWC, which
re-quantises the changed super-blocks with that same quantiser in the cloud and sends
them as blocks (the device never re-quantises a K type: llama.cpp's Q4_K/Q5_K bytes
differ between x86-64 and aarch64), on both tiny architectures (256 wide, so the K types
are really used)."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.converters.export import export  # noqa: E402
from cdcca_edge.converters.gguf_export import llama_quantize  # noqa: E402
from cdcca_edge.converters.validate import TOLERANCES  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact, read_tensor  # noqa: E402
from cdcca_edge.core.encodings import quantize  # noqa: E402
from cdcca_edge.core.patch import apply_delta  # noqa: E402
from cdcca_edge.core.trust import Trust  # noqa: E402
from cdcca_edge.runtime import load  # noqa: E402
from cdcca_edge.runtime.base import GenerationConfig  # noqa: E402
from tests.cloud.test_dwc import PROBE, make_lora  # noqa: E402
from tests.conftest import ARCHS  # noqa: E402
from tests.converters.test_export import PROMPTS, torch_rank  # noqa: E402

CASES = [(a, q) for a in ARCHS for q in ("q4_k_m", "q6_k")] + [("llama", "q5_k_m"), ("llama", "q4_k_s")]
# the matrix types each mix must contain on a 256-wide model (llama.cpp's recipes)
MIX_TYPES = {"q4_k_m": {"Q4_K", "Q6_K"}, "q4_k_s": {"Q4_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}


@pytest.fixture(scope="module")
def k_exports(wide_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    cache = {}

    def get(arch, quant):
        if (arch, quant) not in cache:
            cache[arch, quant] = export(wide_models[arch], root / f"{arch}-{quant}.gguf", "gguf", quant=quant)
        return cache[arch, quant]

    return get


@pytest.mark.parametrize("arch,quant", CASES)
def test_kquant_export_runs_in_llama_cpp(arch, quant, k_exports, wide_models, tmp_path):
    result = k_exports(arch, quant)
    v = result.validation
    assert v.passed and v.normalized_diff <= TOLERANCES[("gguf", quant)]
    art = open_artifact(result.path)
    assert compute_identity(art).digest == result.identity == art.metadata["cdcca.export_identity"]
    assert art.metadata["cdcca.quant"] == quant
    types = Counter(t.type_name for t in art.tensors if len(t.shape) == 2)
    assert MIX_TYPES[quant] <= set(types), types
    assert {t.type_name for t in art.tensors if len(t.shape) == 1} == {"F32"}
    # the tensors are llama.cpp's bytes: quantising the F32 export with llama.cpp directly
    # gives the same identity (the header was rewritten, the tensors were not)
    f32 = export(wide_models[arch], tmp_path / "f32.gguf", "gguf", quant="f32", validate=False).path
    llama_quantize(f32, tmp_path / "direct.gguf", quant)
    assert compute_identity(open_artifact(tmp_path / "direct.gguf")).digest == result.identity
    # and the quantiser a patch uses writes those very bytes from the F32 values
    src = {t.name: t for t in open_artifact(f32).tensors}
    for t in art.tensors:
        if t.type_name != "F32":
            assert quantize(t.type_name, np.frombuffer(read_tensor(src[t.name]), np.float32)) == read_tensor(t), t.name
    with load(result.path, backend="llama") as model:
        for prompt in PROMPTS:
            gen = model.generate(prompt, GenerationConfig(max_tokens=12))
            worst = torch_rank(wide_models[arch], gen.prompt_tokens, gen.tokens)
            assert worst <= 2, prompt  # every token among torch's top 3, as for q4_0


def test_narrow_rows_fall_back_as_llama_cpp_does(tiny_models, tmp_path):
    """64-wide rows are no multiple of 256: llama.cpp writes Q5_0 / Q8_0 instead of
    Q4_K / Q6_K, and the export still validates and runs."""
    result = export(tiny_models["llama"], tmp_path / "m.gguf", "gguf", quant="q4_k_m")
    types = {t.type_name for t in open_artifact(result.path).tensors if len(t.shape) == 2}
    assert not types & {"Q4_K", "Q5_K", "Q6_K"} and types & {"Q5_0", "Q8_0"}, types
    assert result.validation.passed


@pytest.mark.parametrize("arch,quant", [(a, q) for a in ARCHS for q in ("q4_k_m", "q6_k")])
def test_kquant_diff_delta_and_patch(arch, quant, k_exports, wide_models, tmp_path):
    """Exact super-block replacement: the device's Q4_K_M / Q6_K file becomes the fresh
    export of the updated model, byte for byte, through `delta diff` and `patch`."""
    base = k_exports(arch, quant).path
    lora = make_lora(wide_models[arch], tmp_path / "lora", seed=3)
    target = export(wide_models[arch], tmp_path / "target.gguf", "gguf", quant=quant, adapter=lora)
    device = tmp_path / "device.gguf"
    shutil.copy(base, device)
    assert main(["delta", "diff", str(base), str(target.path), "-o", str(tmp_path / "d.cdcd")]) == 0
    assert main(["patch", str(device), str(tmp_path / "d.cdcd")]) == 0
    assert compute_identity(open_artifact(device)).digest == target.identity
    assert device.read_bytes()[-open_artifact(device).tensor_bytes:] == \
        target.path.read_bytes()[-open_artifact(target.path).tensor_bytes:]
    with load(device, backend="llama") as model:
        assert model.generate(PROMPTS[0], GenerationConfig(max_tokens=4)).tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_dwc_on_a_kquant_mirror(arch, k_exports, wide_models, tmp_path):
    """A LoRA update on Q4_K_M: the K-type tensors' changed super-blocks are re-quantised
    in the cloud by llama.cpp's quantiser and sent as blocks (Q6_K too), the device ends
    byte-exact with the cloud's advanced mirror, and the update arrives (probe KL falls)."""
    from cdcca_edge.cloud.dwc import make_delta
    from cdcca_edge.core.delta_format import read_delta

    mirror = tmp_path / "mirror.gguf"
    shutil.copy(k_exports(arch, "q4_k_m").path, mirror)
    device = tmp_path / "device.gguf"
    shutil.copy(mirror, device)
    before = {t.name: read_tensor(t) for t in open_artifact(mirror).tensors}
    lora = make_lora(wide_models[arch], tmp_path / "lora", seed=4)
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=wide_models[arch], probe=PROBE,
                     advance_mirror=True)
    assert rep.probe_kl < 0.5 * rep.probe_kl_before, (rep.probe_kl, rep.probe_kl_before)
    records = read_delta(tmp_path / "d.cdcd").header.records
    k_records = [r for r in records if r.type in ("Q4_K", "Q5_K", "Q6_K")]
    assert k_records and all(r.encoding == "replace" for r in k_records)
    assert {r.type for r in k_records} >= {"Q4_K"}
    assert apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none()).applied
    assert compute_identity(open_artifact(device)).digest == compute_identity(open_artifact(mirror)).digest \
        == rep.target_identity
    changed = [t.name for t in open_artifact(device).tensors if t.type_name == "Q4_K" and read_tensor(t) != before[t.name]]
    assert changed, "no Q4_K tensor was updated"


def test_ten_rounds_on_a_kquant_mirror_do_not_drift(k_exports, wide_models, tmp_path):
    """As tests/cloud/test_dwc.py's ten rounds, on Q4_K_M, with a device that follows:
    each round's delta is built against the mirror's exact bytes, the device applies it
    and stays byte-exact with the mirror, and the weight error stays at the floor."""
    from cdcca_edge.cloud.dwc import make_delta

    base = wide_models["llama"]
    mirror, device = tmp_path / "mirror.gguf", tmp_path / "device.gguf"
    shutil.copy(k_exports("llama", "q4_k_m").path, mirror)
    shutil.copy(mirror, device)
    errors, kinds = [], Counter()
    for k in range(10):
        lora = make_lora(base, tmp_path / f"lora{k}", seed=100 + k, scale=0.2)
        rep = make_delta(mirror, lora, tmp_path / f"d{k}.cdcd", target_base=base, advance_mirror=True)
        assert apply_delta(device, tmp_path / f"d{k}.cdcd", trust=Trust.none()).applied
        assert compute_identity(open_artifact(device)).digest == rep.target_identity, k
        errors.append(rep.relative_error)
        kinds.update(rep.records_by_encoding)
    assert max(errors) <= 1.5 * min(errors), errors
    assert errors[-1] <= 1.2 * errors[0], errors
    assert kinds["replace"] >= 1, kinds
