"""One real `cloud serve` and three real `device serve` processes: the tiny text model as
GGUF (llama.cpp) and as ONNX (onnxruntime), and the tiny LLaVA as a multimodal bundle.
An app (the openai package) asks each, streaming and not, with images for the bundle;
the uncertain answers go up, a round runs per cohort, every agent updates in place
(the bundle and the ONNX directory through the same signed deltas) and reports the
identity the cloud published; later answers come from the new weights."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.cloud.service.ops import mirror_path  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from tests.cloud.test_service import Service, _create  # noqa: E402
from tests.procs import wait_for  # noqa: E402
from tests.runtime.test_agent import Agent  # noqa: E402
from tests.runtime.test_agent_sync import published_versions, settled  # noqa: E402


def data_url(image) -> str:
    """An (H, W, 3) uint8 image as the PNG data URL an app sends in an image_url part."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _text_calibration(model, tmp_path, name):
    from cdcca_edge.demo.tiny import text_prompts

    src = tmp_path / f"{name}-source.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in text_prompts("source", 30, seed=30)))
    out = tmp_path / f"{name}-calib.json"
    assert main(["uplink", "calibrate", str(model), "--inputs", str(src), "-o", str(out), "--rate", "0.3",
                 "-n", "10"]) == 0
    return out


def _image_calibration(bundle, tmp_path):
    """The bundle's calibration, with the visual statistics of source-domain images."""
    from cdcca_edge.demo.scenes import dataset
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from cdcca_edge.runtime.uts import calibrate

    ident = compute_identity(open_artifact(bundle)).digest
    with MultimodalModel(bundle) as mm:
        cal = calibrate(mm, [{"prompt": e.question.text, "image": e.image}
                             for e in dataset(16, seed=1, domains=("source",))], ident, rate=0.5, max_tokens=4)
    out = tmp_path / "mm-calib.json"
    cal.save(out)
    return out


def test_three_agents_one_cloud(tmp_path, capsys):
    from cdcca_edge.converters.export import export
    from cdcca_edge.demo.scenes import SHIFTED, dataset
    from cdcca_edge.demo.tiny import build_tiny_model, text_prompts
    from cdcca_edge.demo.tiny_llava import build_tiny_llava
    from tests.cloud.test_akd import STUDENT, TEACHER
    from tests.cloud.test_multimodal import SPEC_S, SPEC_T
    from tests.requires import needs_llama

    needs_llama()
    teacher = build_tiny_model(tmp_path / "teacher", TEACHER)
    student = build_tiny_model(tmp_path / "student", STUDENT)
    mm_teacher = build_tiny_llava(tmp_path / "mm-teacher", replace(SPEC_T, train_steps=30))
    mm_student = build_tiny_llava(tmp_path / "mm-student", SPEC_S, vision_from=mm_teacher)
    made = {"gguf": export(student, tmp_path / "student.gguf", "gguf", quant="q8_0").path,
            "onnx": export(student, tmp_path / "student-onnx", "onnx").path,
            "mm": export(mm_student, tmp_path / "student-bundle", "gguf", quant="f32").path}
    pairs = {"gguf": (teacher, student), "onnx": (teacher, student), "mm": (mm_teacher, mm_student)}
    data = tmp_path / "data"
    devices, states = {}, {}
    for kind, art in made.items():
        art = open_artifact(art).root
        _create(tmp_path, data, f"fleet-{kind}", art, "--teacher", str(pairs[kind][0]),
                "--student", str(pairs[kind][1]))
        devices[kind] = tmp_path / f"device-{kind}{'.gguf' if kind == 'gguf' else ''}"
        (shutil.copy if kind == "gguf" else shutil.copytree)(art, devices[kind])
    calibs = {"gguf": _text_calibration(devices["gguf"], tmp_path, "gguf"),
              "onnx": _text_calibration(devices["onnx"], tmp_path, "onnx"),
              "mm": _image_calibration(devices["mm"], tmp_path)}
    svc = Service(data)
    svc.start("--min-uploads", "1", "--round-poll", "0.5")
    agents = {}
    try:
        for kind in made:
            capsys.readouterr()
            assert main(["cloud", "enroll-token", "--cohort", f"fleet-{kind}", "--data", str(data)]) == 0
            states[kind] = tmp_path / f"state-{kind}"
            assert main(["sync", "enroll", svc.url, capsys.readouterr().out.strip(), "--state",
                         str(states[kind])]) == 0
        for kind in made:
            agents[kind] = Agent(devices[kind], "--cloud-state", str(states[kind]), "--calib", str(calibs[kind]),
                                 "--sync-every", "1")
        clients = {k: openai.OpenAI(base_url=f"{a.url}/v1", api_key="unused") for k, a in agents.items()}
        probe_image = data_url(dataset(1, seed=99, domains=("noise",))[0].image)

        def probe(kind):
            if kind == "mm":
                r = clients[kind].chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
                    {"type": "text", "text": "what colour is the shape?"},
                    {"type": "image_url", "image_url": {"url": probe_image}}]}])
            else:
                r = clients[kind].completions.create(model="m", prompt="the red circle is", max_tokens=10)
            return r.model_extra["cdcca"]

        before = {k: probe(k) for k in made}
        for kind in ("gguf", "onnx"):  # drifted text: each agent is unsure of many answers
            for i, p in enumerate(text_prompts("target", 24, seed=31)):
                if i % 4 == 0:  # streamed, as chat apps ask
                    chunks = list(clients[kind].chat.completions.create(
                        model="m", messages=[{"role": "user", "content": p}], max_tokens=10, stream=True))
                    assert chunks[-1].model_extra["cdcca"]["sample"]
                else:
                    clients[kind].completions.create(model="m", prompt=p, max_tokens=10)
        for i, ex in enumerate(dataset(24, seed=5, domains=SHIFTED)):  # drifted images
            r = clients["mm"].chat.completions.create(model="m", max_tokens=4, stream=i % 6 == 0, messages=[
                {"role": "user", "content": [{"type": "text", "text": ex.question.text},
                                             {"type": "image_url", "image_url": {"url": data_url(ex.image)}}]}])
            if i % 6 == 0:
                assert "".join(c.choices[0].delta.content or "" for c in r if c.choices)  # the answer, whole
        for kind, a in agents.items():
            m = httpx.get(f"{a.url}/metrics").text
            assert "cdcca_agent_spooled_total 0" not in m, kind

        for kind in made:
            now = wait_for(f"the {kind} agent to settle on the latest version",
                           lambda k=kind: settled(data, f"fleet-{k}", clients[k], agents[k].url), 600)
            versions, _ = published_versions(data, f"fleet-{kind}")
            assert now["identity"] == versions[now["version"]] == compute_identity(open_artifact(devices[kind])).digest
            assert now["identity"] == compute_identity(open_artifact(mirror_path(
                data, f"fleet-{kind}", "gguf" if kind == "gguf" else "directory"))).digest
            m = httpx.get(f"{agents[kind].url}/metrics").text
            assert "cdcca_agent_updates_total 0\n" not in m and "cdcca_agent_update_failures_total 0\n" in m, kind
            again = probe(kind)
            assert again["model_identity"] == now["identity"] != before[kind]["model_identity"]
            # the new weights answer: the same request scores differently
            assert [t["entropy"] for t in again["tokens"]] != [t["entropy"] for t in before[kind]["tokens"]], kind
            # the agent reported the version it runs (after its update, asynchronously)
            wait_for(f"the {kind} agent's report", lambda k=kind, n=now["version"]: (
                f'cdcca_devices{{cohort="fleet-{k}",version="{n}"}} 1.0' in httpx.get(f"{svc.url}/metrics").text), 30)
        # the bundle's uploads carried vision tokens, not images
        from cdcca_edge.cloud.service.blobs import BlobStore
        from cdcca_edge.core.uplink_format import read_uplink

        from sqlalchemy import select

        from cdcca_edge.cloud.service.store import Upload, cohort_named, database_url, open_db

        with open_db(database_url(data))() as s:
            c = cohort_named(s, "fleet-mm")
            shas = list(s.scalars(select(Upload.sha256).where(Upload.cohort_id == c.id)))
        samples = [x for sha in shas for x in read_uplink(BlobStore(data / "blobs").path(sha)).samples()]
        assert samples and all("visual_features" in x.arrays and "raw_image" not in x.arrays for x in samples)
    finally:
        for a in agents.values():
            a.stop()
        svc.stop()
