"""Crash trials: a patch killed with SIGKILL at every crash point and at >= 100 random
moments, per artefact kind (a GGUF file, an ONNX directory, a multimodal bundle), then
recovered through each entry point a device has: ``cdcca-edge patch --recover``,
``cdcca-edge run`` (``run --image`` for a bundle), the next patch, ``runtime.load`` /
``MultimodalModel`` and ``patch.recover``. After every trial the artefact's identity is
exactly its base's or its target's, no journal is left and none was quarantined
(docs/formats/delta.md, 6 and 6.2: "After recovery the artefact is exactly its base or
its target").

Artefacts are real exports of the tiny models (loadable by llama.cpp and onnxruntime), one
delta per kind with ten records on ten tensors (replace, qadd and low-rank). The patcher
runs in a child forked from this process (no interpreter start-up per trial); the parent
SIGKILLs it after a random delay, or the crash hook kills it at its N-th crash point
(``CDCCA_TEST_CRASH_AFTER``). Every trial calls ``hostile("crash-<kind>")``, so the run's
summary line reports how many ran.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.core import patch as P  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from cdcca_edge.core.delta_build import DeltaBuilder  # noqa: E402
from cdcca_edge.core.ggml import type_layout  # noqa: E402
from cdcca_edge.core.state import read_state, record_export, state_is_current, state_path_for  # noqa: E402
from cdcca_edge.core.trust import Trust  # noqa: E402
from tests.hostile import SUMMARY, hostile  # noqa: E402

NONE = Trust.none()
CRASH_ENV = "CDCCA_TEST_CRASH_AFTER"
KINDS = ("gguf", "onnx", "bundle")
RECORDS = 10  # per delta: one journal entry each, so 2 * 10 + 4 crash points at least
RANDOM_KILLS = 100  # SIGKILLs at random moments, per kind
RANDOM_POINTS = 20  # and kills at random crash points, per kind
RECOVERY_KILLS = 10  # recoveries themselves killed at random moments (6.2: idempotent)
SUBPROCESS_PER_CLI_ENTRY = 2  # per kind, CLI entry points through the console script; the
# rest call cli.main in this process (the same code, without 1-3 s of start-up each)
CHILD_TIMEOUT = 120.0  # seconds before a stuck child fails the test (never reached)

# The entry points that recover an interrupted patch, per kind (a bundle is not a text
# model: `run` needs --image, runtime.load refuses it after recovering, MultimodalModel
# is its loader).
ENTRY_POINTS = {
    "gguf": ("recover", "cli --recover", "cli run", "next patch", "runtime.load"),
    "onnx": ("recover", "cli --recover", "cli run", "next patch", "runtime.load"),
    "bundle": ("recover", "cli --recover", "cli run --image", "next patch", "MultimodalModel"),
}
# Every entry point says what recovery did (`run` on stderr, the library in its result).
REPORTING = {"recover", "cli --recover", "next patch", "cli run", "cli run --image", "runtime.load",
             "MultimodalModel"}


# --- artefacts and deltas ----------------------------------------------------------------


@dataclass
class Case:
    kind: str
    base: Path  # the pristine artefact: copied per trial, never patched itself
    delta: Path
    base_identity: str
    target_identity: str
    work: Path  # trial copies go here
    image: Path | None = None  # for `run --image` on a bundle
    trials: dict[str, int] = field(default_factory=dict)  # per entry point
    subprocesses: dict[str, int] = field(default_factory=dict)  # per CLI entry point


def _copy_artefact(src: Path, dst_dir: Path) -> Path:
    """The artefact at ``src`` (a GGUF file with its sidecar, or a directory) copied into
    ``dst_dir``; returns the copy's path."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
        sidecar = state_path_for(src)
        if sidecar.exists():
            shutil.copy(sidecar, state_path_for(dst))
    return dst


def _new_units(t, start: int, n: int, rng: np.random.Generator) -> bytes:
    """``n`` units of tensor ``t`` from unit ``start`` on, moved slightly off their values
    (finite, so the patched model still runs)."""
    import gguf

    _, unit = type_layout(t.type_name)
    with open(t.file, "rb") as f:
        f.seek(t.offset + start * unit)
        old = np.frombuffer(f.read(n * unit), np.uint8)
    if t.type_name == "F32":
        x = old.view(np.float32)
        return (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32).tobytes()
    if t.type_name == "F16":
        x = old.view(np.float16).astype(np.float32)
        return (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float16).tobytes()
    qt = gguf.GGMLQuantizationType[t.type_name]
    x = gguf.quants.dequantize(old.reshape(n, unit), qt).reshape(n, -1)
    return gguf.quants.quantize(x + 0.01 * rng.standard_normal(x.shape).astype(np.float32), qt).tobytes()


def _build_delta(base: Path, out: Path, seed: int) -> None:
    """A delta of RECORDS records on as many tensors, cycling replace / qadd / low-rank.
    Tensors are taken evenly from the artefact's table, alternating between a bundle's two
    parts, so the journal's entries alternate between its data files."""
    rng = np.random.default_rng(seed)
    art = open_artifact(base)
    usable = [t for t in art.tensors if t.type_name in ("F32", "F16", "Q8_0") and t.n_elements % 32 == 0]
    by_file: dict[Path, list] = {}
    for t in usable:
        by_file.setdefault(t.file, []).append(t)
    lists = list(by_file.values())
    picked = []
    for i in range(RECORDS):  # record i: file i mod F, then evenly spaced through its tensors
        pool, k = lists[i % len(lists)], i // len(lists)
        picked.append(pool[k * len(pool) * len(lists) // RECORDS % len(pool)])
    assert len({t.name for t in picked}) == RECORDS, "pick distinct tensors"
    b = DeltaBuilder(art)
    for i, t in enumerate(picked):
        _, unit = type_layout(t.type_name)
        n_units = t.nbytes // unit
        op = "replace" if len(t.shape) == 1 else ("replace", "qadd", "lowrank")[i % 3]
        if op == "replace":
            # two runs with a gap in one record: scattered spans in one journal entry
            k = max(1, min(8, n_units // 4))
            k2 = max(1, k - 1)
            s = int(rng.integers(0, n_units - 2 * k))
            b.replace_units(t.name, [s, s + k + 1], [k, k2],
                            _new_units(t, s, k, rng) + _new_units(t, s + k + 1, k2, rng))
        elif op == "qadd":
            n_groups = t.n_elements // 32
            g = min(4, n_groups)
            b.add_quantized(t.name, [(0, g)], np.full(g, 2e-3, np.float16),
                            rng.integers(-127, 128, g * 32))
        else:
            cols = t.shape[-1]
            rows = t.n_elements // cols
            b.add_low_rank(t.name, rng.standard_normal((2, cols)) * 0.1,
                           rng.standard_normal((rows, 2)) * 0.1, 0.05)
    b.write(out)


def _identity(path: Path) -> str:
    return compute_identity(open_artifact(path)).digest


def _make_case(kind: str, src: Path, root: Path, seed: int, image: Path | None = None) -> Case:
    base = _copy_artefact(src, root / "base")
    delta = root / "d.cdcd"
    _build_delta(base, delta, seed)
    target = _copy_artefact(base, root / "target")
    P.apply_delta(target, delta, trust=NONE)
    case = Case(kind, base, delta, _identity(base), _identity(target), root / "trials", image)
    assert case.base_identity != case.target_identity
    shutil.rmtree(root / "target")
    return case


@pytest.fixture(scope="module")
def cases(exports, llava_bundles, tmp_path_factory) -> Iterator[dict[str, Case]]:
    """One Case per kind: the tiny Llama's Q8_0 GGUF and f32 ONNX exports, and a bundle
    (ONNX vision part, GGUF language part) of a tiny LLaVA trained for a few steps."""
    root = tmp_path_factory.mktemp("crash")
    image = root / "image.npy"
    np.save(image, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    made = {
        "gguf": _make_case("gguf", exports("llama", "gguf", "q8_0").path, root / "gguf", 1),
        "onnx": _make_case("onnx", exports("llama", "onnx").path, root / "onnx", 2),
        "bundle": _make_case("bundle", llava_bundles("gguf"), root / "bundle-case", 3, image),
    }
    yield made
    # the trials per entry point, for the evidence (the total per kind is on the
    # "hostile cases" summary line); printed at the end of the run (tests/conftest.py)
    for kind, case in made.items():
        if case.trials:
            by = ", ".join(f"{e} {case.trials.get(e, 0)}" for e in ENTRY_POINTS[kind])
            sub = ", ".join(f"{e} {n}" for e, n in sorted(case.subprocesses.items()))
            SUMMARY.append(f"crash trials {kind}: {sum(case.trials.values())} ({by}; "
                           f"of these through the console script: {sub or 'none'})")


# --- a patch killed in a forked child --------------------------------------------------------


@dataclass
class Child:
    killed: bool  # SIGKILLed (by the hook or the parent) rather than finished
    seconds: float  # from the child's start of apply_delta to its end


def _fork(target, crash_after: int | None = None, kill_after: float | None = None) -> Child:
    """Run ``target()`` in a forked child; SIGKILL it ``kill_after`` seconds after it
    starts, or let the crash hook kill it at crash point ``crash_after``. The child never
    returns into pytest (os._exit); its traceback, if any, fails the test."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only patches
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.environ.pop(CRASH_ENV, None)
            if crash_after is not None:
                os.environ[CRASH_ENV] = str(crash_after)
            os.write(w, b"S")
            target()
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the parent through the pipe
            os.write(w, traceback.format_exc().encode()[-8000:])
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
        started = time.perf_counter()
        if ready and kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the patching child did not finish in {CHILD_TIMEOUT} s")
            time.sleep(0.001)
        seconds = time.perf_counter() - started
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
    report = b"".join(chunks)[1:].decode(errors="replace")
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"child died of signal {os.WTERMSIG(status)}"
        return Child(True, seconds)
    assert os.WEXITSTATUS(status) == 0, f"the child failed:\n{report}"
    return Child(False, seconds)


def _patch_child(model: Path, delta: Path, **kw) -> Child:
    return _fork(lambda: P.apply_delta(model, delta, trust=NONE), **kw)


# --- recovery through one entry point --------------------------------------------------------


def _cli_env(tmp: Path) -> dict[str, str]:
    """The environment for a console-script run: no crash hook, no configured trust."""
    env = {k: v for k, v in os.environ.items()
           if k not in (CRASH_ENV, "CDCCA_TRUSTED_KEYS", "CDCCA_CONFIG", "CDCCA_DEBUG")}
    env["XDG_CONFIG_HOME"] = str(tmp / "xdg-config")  # no config file: Trust.none()
    return env


def _console(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("cdcca-edge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cdcca_edge.cli"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=_cli_env(tmp))
    assert proc.returncode == 0, f"cdcca-edge {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _in_process(args: list[str], capsys) -> tuple[str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"cdcca-edge {' '.join(args)}: exit {code}\n{err[-4000:]}"
    return out, err


def _found_first(err: str) -> str | None:
    """What `run` reports it recovered first (cli.app._report_recovery), if anything."""
    for line in err.splitlines():
        if "an interrupted patch was found first: " in line:
            return line.split("an interrupted patch was found first: ", 1)[1].strip()
    return None


def _recover_via(entry: str, model: Path, case: Case, capsys) -> str | None:
    """Recover ``model`` through ``entry``; returns what recovery reported it did, where
    the entry point says (None: nothing to recover, or not reported)."""
    sub = entry.startswith("cli") or entry == "next patch"
    if sub and case.subprocesses.get(entry, 0) < SUBPROCESS_PER_CLI_ENTRY:
        case.subprocesses[entry] = case.subprocesses.get(entry, 0) + 1
        tmp = model.parent
        if entry == "cli --recover":
            return json.loads(_console(["patch", "--recover", str(model), "--json"], tmp).stdout)["recovered"]
        if entry == "next patch":
            doc = json.loads(_console(["patch", str(model), str(case.delta), "--json"], tmp).stdout)
            return doc["recovered"]
        args = ["run", str(model), "-p", "the", "-n", "2", "--threads", "1", "--json"]
        if entry == "cli run --image":
            args[2:2] = ["--image", str(case.image)]
        return _found_first(_console(args, tmp).stderr)
    if entry == "recover":
        return P.recover(model)
    if entry == "cli --recover":
        out, _ = _in_process(["patch", "--recover", str(model), "--json"], capsys)
        return json.loads(out)["recovered"]
    if entry in ("cli run", "cli run --image"):
        args = ["run", str(model), "-p", "the", "-n", "2", "--threads", "1", "--json"]
        if entry == "cli run --image":
            args[2:2] = ["--image", str(case.image)]
        _, err = _in_process(args, capsys)
        return _found_first(err)
    if entry == "next patch":
        return P.apply_delta(model, case.delta, trust=NONE).recovered
    if entry == "runtime.load":
        from cdcca_edge.runtime import load

        backend = load(model, n_threads=1)
        backend.close()
        return backend.recovered
    if entry == "MultimodalModel":
        from cdcca_edge.runtime.multimodal import MultimodalModel

        mm = MultimodalModel(model, n_threads=1)
        outcome = mm.recovered
        mm.close()
        return outcome
    raise AssertionError(entry)


def _check(model: Path, case: Case, entry: str) -> str:
    """The artefact after recovery: exactly base or target ("base"/"target"), no journal,
    nothing quarantined, and a sidecar that vouches only for the bytes on disk."""
    jp = P.journal_path_for(model)
    assert not os.path.lexists(jp), f"{entry}: the journal {jp} is still there"
    where = model if model.is_dir() else model.parent
    aside = [p.name for p in where.iterdir() if "quarantined" in p.name]
    assert not aside, f"{entry}: recovery quarantined a genuine journal: {aside}"
    stray = [p.name for p in where.iterdir() if p.name.startswith(".") and ".cdcca-state." in p.name]
    assert not stray, f"{entry}: a kill inside the commit left {stray}"
    art = open_artifact(model)
    got = compute_identity(art).digest
    assert got in (case.base_identity, case.target_identity), (
        f"{entry}: the model is neither old nor new after recovery ({got[:16]})")
    state = read_state(art)
    if state is not None and state_is_current(art, state):
        assert state.identity == got, f"{entry}: the sidecar vouches for other bytes than the model's"
    if entry == "next patch":
        assert got == case.target_identity, "the next patch did not reach the target"
    return "base" if got == case.base_identity else "target"


class Trials:
    """Runs the trials of one case, entry points taken round-robin."""

    def __init__(self, case: Case, capsys, start: int = 0) -> None:
        self.case = case
        self.capsys = capsys
        self.n = 0
        self.turn = start

    def fresh(self) -> Path:
        """A fresh copy of the base; every other one with a current sidecar, as an export
        or a committed patch leaves it (the patcher then trusts the recorded identity)."""
        self.n += 1
        d = self.case.work / f"t{self.n}"
        shutil.rmtree(d, ignore_errors=True)
        model = _copy_artefact(self.case.base, d)
        if self.n % 2:
            record_export(open_artifact(model), self.case.base_identity)
        return model

    def next_entry(self) -> str:
        entries = ENTRY_POINTS[self.case.kind]
        entry = entries[self.turn % len(entries)]
        self.turn += 1
        return entry

    def recover(self, model: Path, entry: str | None = None) -> tuple[str, str | None]:
        """Recover through ``entry`` (default: the next in turn) and check the model:
        ("base" or "target", what the entry point reported recovery did)."""
        entry = entry or self.next_entry()
        outcome = _recover_via(entry, model, self.case, self.capsys)
        if outcome is not None:
            assert outcome in ("discarded", "rolled back", "rolled forward"), f"{entry}: {outcome}"
        result = _check(model, self.case, entry)
        self.case.trials[entry] = self.case.trials.get(entry, 0) + 1
        hostile(f"crash-{self.case.kind}")
        shutil.rmtree(model.parent)
        return result, outcome


# --- the trials --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_crash_point(cases, kind, capsys):
    """Crash at crash point 1, 2, ... until the patch runs to the end; recover each time.
    Before the commit the model comes back as its base, after it as its target; recovery
    discards an unfinished journal, then rolls back, and rolls forward only after the
    commit (docs/formats/delta.md, 6.2)."""
    case = cases[kind]
    trials = Trials(case, capsys)
    seen = []  # (result, outcome, entry) per crash point
    for n in range(1, 10 * RECORDS + 50):
        model = trials.fresh()
        entry = trials.next_entry()
        child = _patch_child(model, case.delta, crash_after=n)
        if not child.killed:  # n is past the last crash point: the patch completed
            assert not os.path.lexists(P.journal_path_for(model))
            assert _check(model, case, "completed patch") == "target"
            shutil.rmtree(model.parent)
            break
        assert os.path.lexists(P.journal_path_for(model)), f"crash point {n} left no journal"
        result, outcome = trials.recover(model, entry)
        seen.append((result, outcome, entry))
    else:
        pytest.fail("the patch never ran to its end")
    points = len(seen)
    assert points >= 2 * RECORDS + 4, f"{points} crash points for {RECORDS} records"
    # before the last crash point (after the commit) the model is its base again; the
    # next patch then takes it to the target whatever recovery found
    for n, (result, outcome, entry) in enumerate(seen, 1):
        committed = n == points
        if entry != "next patch":
            assert result == ("target" if committed else "base"), f"crash point {n}, {entry}: {result}"
        if entry in REPORTING:
            assert outcome is not None, f"crash point {n}: {entry} did not report the recovery"
        if outcome is not None:
            allowed = {"rolled forward"} if committed else {"discarded", "rolled back"}
            assert outcome in allowed, f"crash point {n}, {entry}: {outcome}"
    # an unfinished journal (crash while journaling) is discarded, a finished one rolled back
    order = [o for _, o, _ in seen[:-1] if o is not None]
    assert order == sorted(order, key=lambda o: o != "discarded"), order
    assert "discarded" in order and "rolled back" in order


@pytest.mark.parametrize("kind", KINDS)
def test_random_kills(cases, kind, capsys):
    """RANDOM_KILLS patches SIGKILLed at a random moment (uniform over a full patch's
    duration, measured here) and RANDOM_POINTS at a random crash point; each recovered
    through the next entry point. Never a model that is neither old nor new."""
    case = cases[kind]
    rng = random.Random(f"crash-trials-{kind}")
    trials = Trials(case, capsys, start=KINDS.index(kind))
    durations = []
    for _ in range(3):
        model = trials.fresh()
        child = _patch_child(model, case.delta)
        assert not child.killed
        assert _check(model, case, "completed patch") == "target"
        shutil.rmtree(model.parent)
        durations.append(child.seconds)
    full = sorted(durations)[1]
    plan = [("kill", rng.uniform(0.0, full)) for _ in range(RANDOM_KILLS)]
    plan += [("point", rng.randint(1, 2 * RECORDS + 4)) for _ in range(RANDOM_POINTS)]
    rng.shuffle(plan)
    for how, at in plan:
        model = trials.fresh()
        if how == "kill":
            child = _patch_child(model, case.delta, kill_after=at)
        else:
            child = _patch_child(model, case.delta, crash_after=at)
            assert child.killed
        result, _ = trials.recover(model)
        if not child.killed:
            assert result == "target"


@pytest.mark.parametrize("kind", KINDS)
def test_recovery_killed_too(cases, kind, capsys):
    """A recovery SIGKILLed part-way (a patch crashed in its write pass, then the recovery
    crashed while rolling back) is finished by the next one: recovery is idempotent
    (docs/formats/delta.md, 6.2)."""
    case = cases[kind]
    rng = random.Random(f"crash-recovery-{kind}")
    trials = Trials(case, capsys, start=KINDS.index(kind))

    def crashed_in_write_pass() -> Path:
        # crash points RECORDS + 2 ... 2 * RECORDS + 3: the journal is complete, some or
        # all entries written, nothing committed
        model = trials.fresh()
        assert _patch_child(model, case.delta, crash_after=rng.randint(RECORDS + 2, 2 * RECORDS + 3)).killed
        return model

    durations = []
    for _ in range(3):
        model = crashed_in_write_pass()
        child = _fork(lambda: P.recover(model))
        assert not child.killed
        durations.append(child.seconds)
        assert trials.recover(model, "recover") == ("base", None)
    full = sorted(durations)[1]
    for _ in range(RECOVERY_KILLS):
        model = crashed_in_write_pass()
        _fork(lambda: P.recover(model), kill_after=rng.uniform(0.0, full))
        entry = trials.next_entry()
        result, _ = trials.recover(model, entry)
        assert result == ("target" if entry == "next patch" else "base"), entry
