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
   ``g++-aarch64-linux-gnu`` (generic armv8-a, no native tuning), and llama-cpp-python's
   pure-Python package pointed at it (``LLAMA_CPP_LIB_PATH``);
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
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
LLAMA_CPP_PYTHON = "0.3.36"
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64")
TEST_PACKAGES = ("onnx>=1.17", "httpx>=0.27", "safetensors>=0.4", "diskcache>=5.6", "jinja2>=2.11")  # llama_cpp needs the last two
APT = ("qemu-user-static", "debootstrap", "g++-aarch64-linux-gnu")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# the device-side suite (the cloud side needs torch and runs on the host only)
SUITE_PATHS = ("tests/core", "tests/runtime/test_backends.py", "tests/runtime/test_scores.py",
               "tests/runtime/test_spool.py", "tests/runtime/test_uts.py", "tests/runtime/test_patch_runtime.py",
               "tests/runtime/test_agent.py", "tests/runtime/test_parity.py", "tests/test_device_path.py")
TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


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
    missing = [p for p, exe in zip(APT, ("qemu-aarch64-static", "debootstrap", "aarch64-linux-gnu-g++"))
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
    stamp = fs / "opt" / f".site-{k}"
    target = fs / "opt/site"
    if stamp.exists():
        return target
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
    stamp.touch()
    return target


def llama(cache: Path, fs: Path, jobs: int) -> Path:
    """libllama and libggml for generic armv8-a in /opt/llama/lib, and llama-cpp-python's
    Python package in /opt/llama/python."""
    k = key(LLAMA_CPP_PYTHON, TOOLCHAIN, "generic")
    lib = fs / "opt/llama/lib"
    stamp = fs / "opt" / f".llama-{k}"
    if stamp.exists():
        return lib
    src = cache / "src"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        say(f"fetching llama-cpp-python {LLAMA_CPP_PYTHON}'s source")
        run([sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
             "--no-binary", ":all:", "--no-deps", "-d", str(src)])
    tree = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not tree.exists():
        run(["tar", "xzf", str(sdist), "-C", str(src)])
    build = cache / f"build-{k}"
    (cache / "aarch64.cmake").write_text(TOOLCHAIN)
    say("cross-compiling llama.cpp for aarch64 (a few minutes)")
    run(["cmake", "-S", str(tree / "vendor/llama.cpp"), "-B", str(build),
         f"-DCMAKE_TOOLCHAIN_FILE={cache / 'aarch64.cmake'}", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
         "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF",
         "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"])
    run(["cmake", "--build", str(build), "--target", "llama", f"-j{jobs}"])
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    for so in (build / "bin").glob("*.so*"):
        shutil.copy2(so, lib / so.name, follow_symlinks=False)
    shutil.rmtree(fs / "opt/llama/python", ignore_errors=True)  # apart from /opt/site: rebuilt on its own
    shutil.copytree(tree / "llama_cpp", fs / "opt/llama/python/llama_cpp")
    stamp.touch()
    return lib


def fixtures(cache: Path) -> Path:
    # keyed by every source file that shapes them (building takes seconds)
    sources = sorted((ROOT / "cdcca_edge").rglob("*.py")) + [ROOT / "tests/prebuilt.py", ROOT / "tests/conftest.py"]
    out = cache / f"prebuilt-{key(*sources)}"
    if not (out / "prebuilt.json").exists():
        say("building the fixtures on the host")
        run([sys.executable, "-m", "tests.prebuilt", str(out)], cwd=ROOT)
    return out


def lane(jobs: int, pytest_args: list[str]) -> int:
    from cdcca_edge.core.paths import cache_dir

    check_machine()
    cache = cache_dir() / "arm64"
    cache.mkdir(parents=True, exist_ok=True)
    fs = rootfs(cache)
    site(cache, fs)
    llama(cache, fs, jobs)
    pre = fixtures(cache)
    mounts: list[Path] = []
    try:
        for src, dst, how in ((ROOT, fs / "src", ["--bind"]), (pre, fs / "prebuilt", ["--bind"]),
                              (Path("proc"), fs / "proc", ["-t", "proc"])):
            dst.mkdir(exist_ok=True)
            run(["mount", *how, str(src), str(dst)])
            mounts.append(dst)
        env = {"HOME": "/root", "PATH": "/usr/bin:/bin", "PYTHONPATH": "/src:/opt/site:/opt/llama/python",
               "LLAMA_CPP_LIB_PATH": "/opt/llama/lib", "CDCCA_PREBUILT": "/prebuilt", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = ["chroot", str(fs), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
               "/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               *(pytest_args or [f"/src/{p}" for p in SUITE_PATHS])]
        say("running the device-side tests under qemu-aarch64")
        # onnxruntime's cpuinfo cannot read /sys (never bound): its warnings are harmless
        return subprocess.call(cmd)
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args, rest = ap.parse_known_args()
    try:
        return lane(args.jobs, rest)
    except LaneError as exc:
        print(f"arm64 lane: cannot run here: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
