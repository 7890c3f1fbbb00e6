"""The aarch64 lane (`make test-arm64`): the device-side tests run on an aarch64 Python
under qemu-user, with llama.cpp cross-compiled for aarch64 and the fixtures built on the
host (torch is never installed on the aarch64 side).

    python tools/arm64_lane.py [--jobs 2] [pytest args...]

Steps, each cached under ``$CDCCA_CACHE/arm64/<key>`` (the key hashes its inputs):
1. a Debian bookworm arm64 root file system: ``debootstrap --foreign`` (minbase + python3),
   then the downloaded packages unpacked with ``dpkg-deb -x`` (the second stage would run
   every maintainer script under emulation: minutes instead of seconds);
2. the project's wheel with its ``device`` and ``dev`` extras, plus the test-only packages,
   installed for aarch64 from PyPI's aarch64 wheels (``pip install --target --platform``);
3. llama.cpp as vendored by llama-cpp-python 0.3.36, cross-compiled with Debian's
   ``g++-aarch64-linux-gnu`` twice (generic armv8-a; Pi 5's armv8.2-a+dotprod+fp16),
   each packaged as an installable llama-cpp-python wheel and installed with pip;
4. the fixtures, on the host (tests/prebuilt.py): tiny models, their exports, and the
   host's greedy answers that tests/runtime/test_parity.py compares with.
Then pytest runs in a chroot of that root file system, with the checkout bind-mounted at
/src and /proc mounted (onnxruntime's external data reads /proc/self/fd); /sys is never
bound (onnxruntime segfaults under qemu with the host's /sys). Mounts are undone on exit,
whatever happens.

Needs root (chroot, mounts, binfmt_misc) and Debian's qemu-user-static, debootstrap and
g++-aarch64-linux-gnu (installed with apt-get when missing); without them it fails naming
what is missing, never passes silently.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
LLAMA_CPP_PYTHON = "0.3.36"
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
TEST_PACKAGES = ("onnx>=1.17", "httpx>=0.27", "safetensors>=0.4", "pytest-xdist>=3.5",
                 "diskcache>=5.6", "jinja2>=2.11")  # llama_cpp needs the last two
APT = ("qemu-user-static", "debootstrap", "g++-aarch64-linux-gnu", "cmake")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# the device-side suite (the cloud side needs torch and runs on the host only)
SUITE_PATHS = ("tests/core", "tests/runtime/test_backends.py", "tests/runtime/test_scores.py",
               "tests/runtime/test_spool.py", "tests/runtime/test_uts.py", "tests/runtime/test_patch_runtime.py",
               "tests/runtime/test_agent.py", "tests/runtime/test_parity.py", "tests/test_device_path.py")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON", "-DGGML_OPENMP=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
               # libllama.so, not libllama.so.0 -> .so.0.5.0: a wheel cannot hold symlinks
               "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
               "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN")
# what a manylinux wheel may take from the system (PEP 600); GLIBCXX as of GCC 11
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libstdc++.so.6", "libpthread.so.0", "libdl.so.2",
               "ld-linux-aarch64.so.1"}
MAX_GLIBCXX = (3, 4, 29)
# the backend tests, run again with the Pi 5 build
BACKEND_PATHS = ("tests/runtime/test_backends.py", "tests/runtime/test_parity.py", "tests/runtime/test_patch_runtime.py")
TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


BUILT: list[str] = []  # the steps this run built (the rest came from the cache)


class LaneError(Exception):
    """The lane cannot run on this machine; the message names what is missing."""


def say(msg: str) -> None:
    print(f"arm64 lane: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise LaneError(f"`{' '.join(cmd[:6])} ...` failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def key(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(Path(p).read_bytes() if isinstance(p, Path) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def check_machine() -> None:
    if os.geteuid() != 0:
        raise LaneError("needs root (chroot, bind mounts, binfmt_misc); run `sudo make test-arm64`")
    missing = [p for p, exe in zip(APT, ("qemu-aarch64-static", "debootstrap", "aarch64-linux-gnu-g++", "cmake"))
               if shutil.which(exe) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise LaneError(f"missing {', '.join(missing)} and no apt-get to install them")
        say(f"installing {', '.join(missing)}")
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    if not (BINFMT / "qemu-aarch64").exists():
        if not BINFMT_CONF.is_file():
            raise LaneError(f"{BINFMT_CONF} is missing; reinstall qemu-user-static")
        (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip())  # F flag: works inside the chroot
    if "enabled" not in (BINFMT / "qemu-aarch64").read_text():
        raise LaneError("the qemu-aarch64 binfmt handler is registered but disabled")


def rootfs(cache: Path) -> Path:
    out = cache / f"rootfs-{key(SUITE, MIRROR, 'minbase+python3')}"
    if (out / "usr/bin/python3").exists():
        return out
    BUILT.append("rootfs")
    say("building the arm64 root file system (debootstrap --foreign, packages unpacked)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, str(tmp), MIRROR])
    for deb in sorted((tmp / "var/cache/apt/archives").glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
    (tmp / "tmp").mkdir(exist_ok=True)
    os.chmod(tmp / "tmp", 0o1777)
    os.replace(tmp, out)
    return out


def site(cache: Path, fs: Path) -> Path:
    """The aarch64 packages, installed into the root file system's /opt/site."""
    k = key(ROOT / "pyproject.toml", *TEST_PACKAGES, *PLATFORMS)
    stamp = fs / "opt" / ".site-key"  # one stamp holding the key: a reverted input rebuilds
    target = fs / "opt/site"
    if stamp.exists() and stamp.read_text() == k:
        return target
    stamp.unlink(missing_ok=True)
    BUILT.append("wheels")
    say("installing the aarch64 wheels (device and dev extras)")
    shutil.rmtree(target, ignore_errors=True)
    dist = cache / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)])
    wheel = next(dist.glob("cdcca_edge-*.whl"))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), *plat, "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
         f"{wheel}[device,dev]", *TEST_PACKAGES])
    stamp.write_text(k)
    return target


@dataclass(frozen=True)
class Build:
    """One llama.cpp build for aarch64, and the emulated CPU its tests run on."""

    name: str
    flags: tuple[str, ...]  # extra CMake flags
    qemu_cpu: str  # QEMU_CPU for the tests: a core of the class the build is for
    features: tuple[str, ...]  # what llama_print_system_info must report as on ("X = 1")
    absent: tuple[str, ...] = ()  # and what it must not (the generic build has no dot products)


BUILDS = {
    # the default: plain armv8-a (any 64-bit Pi; Pi 3/4 have no dot-product instructions),
    # tested on an emulated Cortex-A72, the Raspberry Pi 4's core
    "generic": Build("generic", (), "cortex-a72", ("NEON",), ("DOTPROD", "FP16_VA")),
    # Pi 5 class (Cortex-A76): int8 dot products and fp16 arithmetic; tested on qemu's
    # "max" CPU, which has both (a Cortex-A72 would die of SIGILL)
    "pi5": Build("pi5", ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16",), "max", ("NEON", "DOTPROD", "FP16_VA")),
}


def llama_source(cache: Path) -> Path:
    src = cache / "src"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        say(f"fetching llama-cpp-python {LLAMA_CPP_PYTHON}'s source")
        run([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
             "--no-binary", ":all:", "--no-deps", "-d", str(src)])
    tree = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not tree.exists():
        run(["tar", "xzf", str(sdist), "-C", str(src)])
    return tree


def cross_build(cache: Path, jobs: int, build: Build) -> Path:
    """libllama and libggml cross-compiled for ``build``, stripped; returns their directory."""
    k = key(LLAMA_CPP_PYTHON, TOOLCHAIN, *CMAKE_FLAGS, *build.flags)
    out = cache / f"build-{k}"
    lib = out / "lib-stripped"
    if (lib / "libllama.so").exists():
        return lib
    tree = llama_source(cache)
    (cache / "aarch64.cmake").write_text(TOOLCHAIN)
    BUILT.append(f"llama.cpp {build.name}")
    say(f"cross-compiling llama.cpp for aarch64, {build.name} build (a few minutes)")
    run(["cmake", "-S", str(tree / "vendor/llama.cpp"), "-B", str(out),
         f"-DCMAKE_TOOLCHAIN_FILE={cache / 'aarch64.cmake'}", *CMAKE_FLAGS, *build.flags])
    run(["cmake", "--build", str(out), "--target", "llama", f"-j{jobs}"])
    tmp = out / "lib.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for so in (out / "bin").glob("*.so"):
        shutil.copy2(so, tmp / so.name)
    run(["aarch64-linux-gnu-strip", "--strip-unneeded", *map(str, tmp.iterdir())])
    os.replace(tmp, lib)
    return lib


def _elf_requirements(lib: Path) -> tuple[set[str], tuple[int, ...], tuple[int, ...]]:
    """(NEEDED libraries, highest GLIBC_ and GLIBCXX_ symbol versions) of the libraries."""
    needed: set[str] = set()
    glibc: tuple[int, ...] = (2, 17)
    glibcxx: tuple[int, ...] = (3, 4)
    for so in lib.glob("*.so"):
        for line in run(["aarch64-linux-gnu-readelf", "-d", str(so)]).stdout.splitlines():
            if "(NEEDED)" in line:
                needed.add(line.split("[", 1)[1].rstrip("]"))
        for word in run(["aarch64-linux-gnu-objdump", "-T", str(so)]).stdout.replace("(", " ").replace(")", " ").split():
            for prefix in ("GLIBC_", "GLIBCXX_"):
                if word.startswith(prefix) and word[len(prefix):].replace(".", "").isdigit():
                    v = tuple(int(x) for x in word[len(prefix):].split("."))
                    if prefix == "GLIBC_":
                        glibc = max(glibc, v)
                    else:
                        glibcxx = max(glibcxx, v)
    return needed, glibc, glibcxx


def make_wheel(cache: Path, jobs: int, build: Build, out_dir: Path) -> Path:
    """An installable wheel of llama-cpp-python for aarch64 from the cross build: the
    upstream Python package with the libraries in ``llama_cpp/lib`` (where it loads them
    from), versioned ``0.3.36+<build>`` (so ``llama-cpp-python==0.3.36`` accepts it) and
    tagged for the oldest glibc its symbols allow."""
    lib = cross_build(cache, jobs, build)
    needed, glibc, glibcxx = _elf_requirements(lib)
    foreign = needed - {p.name for p in lib.glob("*.so")} - SYSTEM_LIBS
    if foreign or glibcxx > MAX_GLIBCXX:
        raise LaneError(f"the {build.name} build needs {sorted(foreign)} / GLIBCXX_{'.'.join(map(str, glibcxx))}, "
                        "more than a manylinux wheel may; build it on an older toolchain")
    tree = llama_source(cache)
    version = f"{LLAMA_CPP_PYTHON}+{build.name}"
    tag = f"py3-none-manylinux_{glibc[0]}_{glibc[1]}_aarch64"
    dist_info = f"llama_cpp_python-{version}.dist-info"
    files: dict[str, bytes] = {}
    for p in sorted((tree / "llama_cpp").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            files[f"llama_cpp/{p.relative_to(tree / 'llama_cpp').as_posix()}"] = p.read_bytes()
    for so in sorted(lib.glob("*.so")):
        files[f"llama_cpp/lib/{so.name}"] = so.read_bytes()
    # upstream's metadata (dependencies, extras) from the sdist, with this build's version
    # and summary; the long description after the blank line is left out
    head = (tree / "PKG-INFO").read_text().split("\n\n", 1)[0].splitlines()
    keep = [ln for ln in head if ln.split(":", 1)[0] in ("License", "Requires-Python", "Requires-Dist",
                                                        "Provides-Extra", "Classifier", "Project-URL")]
    files[f"{dist_info}/METADATA"] = "\n".join([
        "Metadata-Version: 2.1", "Name: llama_cpp_python", f"Version: {version}",
        f"Summary: Python bindings for llama.cpp, cross-built for aarch64 ({build.name}: "
        f"{' '.join(build.flags) or 'generic armv8-a'}) by cdcca-edge's tools/arm64_lane.py", *keep, ""]).encode()
    files[f"{dist_info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: cdcca-edge arm64_lane\n"
                                   f"Root-Is-Purelib: false\nTag: {tag}\n").encode()
    files[f"{dist_info}/LICENSE"] = (tree / "LICENSE.md").read_bytes()
    record = [f"{name},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"llama_cpp_python-{version}-{tag}.whl"
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    os.replace(tmp, wheel)
    return wheel


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def llama(cache: Path, fs: Path, jobs: int, build: Build) -> Path:
    """llama-cpp-python for ``build``, installed from its wheel (make_wheel) into
    /opt/llama/<name> of the root file system, as a device would install it."""
    wheel = make_wheel(cache, jobs, build, cache / "wheels")
    target = fs / "opt/llama" / build.name
    k = key(wheel)
    stamp = fs / "opt" / f".llama-{build.name}-key"
    if stamp.exists() and stamp.read_text() == k:
        return target
    stamp.unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         "--platform", wheel.name.rsplit("-", 1)[1].removesuffix(".whl"), "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", str(wheel)])
    stamp.write_text(k)
    return target


def fixtures(cache: Path) -> Path:
    # keyed by every source file that shapes them (building takes seconds)
    sources = sorted((ROOT / "cdcca_edge").rglob("*.py")) + [ROOT / "tests/prebuilt.py", ROOT / "tests/conftest.py"]
    out = cache / f"prebuilt-{key(*sources)}"
    if not (out / "prebuilt.json").exists():
        BUILT.append("fixtures")
        say("building the fixtures on the host")
        run([sys.executable, "-m", "tests.prebuilt", str(out)], cwd=ROOT)
    return out


class Stages:
    """Wall time per stage, printed at the end (docs/benchmarks.md, "Device footprint")."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = time.monotonic() - start

    def report(self) -> None:
        """Print the times, and keep them (with what this run built rather than found
        cached) in the cache for bench/arm64.py, if the tests ran."""
        from cdcca_edge.core.paths import cache_dir

        if not any(k.startswith("tests") for k in self.times):
            return
        say("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.times.items())
            + f"; total {sum(self.times.values()):.0f} s")
        doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages_s": self.times,
               "total_s": sum(self.times.values()), "built": BUILT}
        (cache_dir() / "arm64").mkdir(parents=True, exist_ok=True)
        (cache_dir() / "arm64" / "last-run.json").write_text(json.dumps(doc, indent=1))


def chroot_env(build: Build) -> dict[str, str]:
    return {"HOME": "/root", "PATH": "/usr/bin:/bin", "PYTHONPATH": f"/src:/opt/site:/opt/llama/{build.name}",
            "CDCCA_PREBUILT": "/prebuilt", "CDCCA_LLAMA_FEATURES": ",".join(build.features),
            "CDCCA_LLAMA_FEATURES_OFF": ",".join(build.absent),
            "QEMU_CPU": build.qemu_cpu, "PYTHONDONTWRITEBYTECODE": "1"}


def chroot_cmd(fs: Path, build: Build, argv: list[str]) -> list[str]:
    """``argv`` run in the root file system, under qemu with ``build``'s llama.cpp."""
    return ["chroot", str(fs), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in chroot_env(build).items()),
            *argv]


def _mounts_under(fs: Path) -> list[str]:
    """Mount points inside ``fs`` (left by a run that was killed before its clean-up)."""
    root = str(fs.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p == root or p.startswith(root + "/")), reverse=True)


@contextlib.contextmanager
def mounted(fs: Path, pre: Path, binds: dict[str, Path] | None = None):
    """The checkout at /src and the fixtures at /prebuilt (both read-only), ``binds``
    (chroot path -> host path, writable) and /proc mounted in ``fs``; all undone on exit,
    whatever happens (SIGTERM included). Mounts a killed run left are undone first, so a
    later ``rm -rf`` of the cache cannot reach through them."""
    for left in _mounts_under(fs):
        say(f"undoing a mount a previous run left: {left}")
        run(["umount", "-l", left])
    mounts: list[Path] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for src, dst, how, ro in ((ROOT, fs / "src", ["--bind"], True), (pre, fs / "prebuilt", ["--bind"], True),
                                  *((p, fs / d.lstrip("/"), ["--bind"], False) for d, p in (binds or {}).items()),
                                  (Path("proc"), fs / "proc", ["-t", "proc"], False)):
            dst.mkdir(parents=True, exist_ok=True)
            run(["mount", *how, str(src), str(dst)])
            mounts.append(dst)
            if ro:
                run(["mount", "-o", "remount,bind,ro", str(dst)])
        yield
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        signal.signal(signal.SIGTERM, previous)
        left = _mounts_under(fs)
        if left:
            say(f"WARNING: mounts left under {fs}: {', '.join(left)}; undo them with umount -l before deleting it")


def _terminate(signum, frame) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that unmount


def prepare(jobs: int, builds: list[str], stages: Stages | None = None) -> tuple[Path, Path]:
    """Everything the lane needs, built or taken from the cache: (root fs, fixtures)."""
    from cdcca_edge.core.paths import cache_dir

    stages = stages or Stages()
    with stages("machine"):
        check_machine()
    cache = cache_dir() / "arm64"
    cache.mkdir(parents=True, exist_ok=True)
    with stages("rootfs"):
        fs = rootfs(cache)
    with stages("wheels"):
        site(cache, fs)
    for name in builds:
        with stages(f"llama.cpp {name}"):
            llama(cache, fs, jobs, BUILDS[name])
    with stages("fixtures"):
        pre = fixtures(cache)
    return fs, pre


def lane(jobs: int, builds: list[str], pytest_args: list[str]) -> int:
    stages = Stages()
    failed: list[str] = []
    try:
        fs, pre = prepare(jobs, builds, stages)
        with mounted(fs, pre):
            for name in builds:
                build = BUILDS[name]
                paths = pytest_args or [f"/src/{p}" for p in (SUITE_PATHS if name == "generic" else BACKEND_PATHS)]
                say(f"running {len(paths)} test paths under qemu-aarch64 -cpu {build.qemu_cpu} "
                    f"with the {name} llama.cpp")
                # the suite in `jobs` emulated processes (pytest-xdist; a module stays in one)
                par = ["-n", str(jobs), "--dist", "loadfile"] if jobs > 1 and name == "generic" else []
                with stages(f"tests {name}"):
                    # onnxruntime's cpuinfo cannot read /sys (never bound): its warnings are harmless
                    code = subprocess.call(chroot_cmd(fs, build, ["/usr/bin/python3", "-m", "pytest", "-q",
                                                                  "-p", "no:cacheprovider", "-rs", *par, *paths]))
                if code != 0:
                    failed.append(name)
    finally:
        stages.report()
    if failed:
        say(f"FAILED: the tests with the {' and '.join(failed)} build(s)")
        return 1
    return 0


def wheels(jobs: int, builds: list[str], out: Path) -> int:
    """`make wheel-arm64`: the wheels alone (no root needed: only the cross compiler)."""
    from cdcca_edge.core.paths import cache_dir

    for exe in ("aarch64-linux-gnu-g++", "cmake"):
        if shutil.which(exe) is None:
            raise LaneError(f"{exe} is missing; apt-get install g++-aarch64-linux-gnu cmake")
    cache = cache_dir() / "arm64"
    cache.mkdir(parents=True, exist_ok=True)
    for name in builds:
        # one directory per build: side by side, `pip --find-links` would pick +pi5 (it sorts
        # last), which dies of SIGILL on a Pi 4
        wheel = make_wheel(cache, jobs, BUILDS[name], out / name)
        print(wheel)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--build", choices=[*BUILDS, "all"], default="all",
                    help="which llama.cpp build(s) to test with, or to make wheels of (default: all)")
    ap.add_argument("--wheels", type=Path, metavar="DIR",
                    help="only write llama-cpp-python's aarch64 wheels into DIR (make wheel-arm64)")
    args, rest = ap.parse_known_args()
    builds = list(BUILDS) if args.build == "all" else [args.build]
    try:
        if args.wheels:
            return wheels(args.jobs, builds, args.wheels)
        return lane(args.jobs, builds, rest)
    except LaneError as exc:
        print(f"arm64 lane: cannot run here: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
