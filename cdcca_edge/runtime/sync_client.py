"""The device's side of the sync protocol (docs/formats/sync.md): enroll, upload uplink
bundles, ask for updates, fetch them through TUF (python-tuf's ``ngclient``: signed,
fresh, never rolled back), resumable over HTTP Range, and report what the device holds.

Device path: urllib3 and tuf only (no torch, no httpx). The device's state lives in one
directory: ``device.json`` (id, token, cohort, service URL; mode 0600), ``tuf/`` (the
trusted metadata) and ``downloads/`` (partial and verified files).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cdcca_edge.core.errors import CdccaError, IntegrityError, StorageError, UsageError
from cdcca_edge.core.fileio import atomic_file

DEVICE_FILE = "device.json"
CHUNK = 1 << 20
TIMEOUT = 60.0


class SyncError(CdccaError):
    """The service refused a request or could not be reached; ``status`` is the HTTP
    status (0: no answer) and ``code`` the service's error code."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Enrollment:
    url: str
    device_id: str
    token: str
    cohort: str


def _headers(token: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    # urllib3 replaces (not merges) a pool's headers with a request's: always send them all
    headers = {"User-Agent": "cdcca-edge-device", **(extra or {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _pool(token: str | None = None) -> Any:
    import urllib3

    return urllib3.PoolManager(headers=_headers(token), retries=False, timeout=urllib3.Timeout(TIMEOUT))


def _tuf_fetcher(token: str) -> Any:
    """An ngclient fetcher that sends the device token (ngclient's own sends none)."""
    import urllib3
    from tuf.api import exceptions as tufx
    from tuf.ngclient import FetcherInterface

    class BearerFetcher(FetcherInterface):
        def __init__(self) -> None:
            self.pool = _pool(token)

        def _fetch(self, url: str) -> Iterator[bytes]:
            try:
                r = self.pool.request("GET", url, preload_content=False)
            except urllib3.exceptions.MaxRetryError as exc:
                if isinstance(exc.reason, urllib3.exceptions.TimeoutError):
                    raise tufx.SlowRetrievalError from exc
                raise
            except urllib3.exceptions.TimeoutError as exc:
                raise tufx.SlowRetrievalError from exc
            if r.status >= 400:
                r.close()
                raise tufx.DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
            return self._chunks(r)

        @staticmethod
        def _chunks(r: Any) -> Iterator[bytes]:
            try:
                yield from r.stream(CHUNK)
            except urllib3.exceptions.TimeoutError as exc:
                raise tufx.SlowRetrievalError from exc
            finally:
                r.release_conn()

    return BearerFetcher()


class SyncClient:
    """A device's connection to the service, its state in ``state_dir``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.resumed_at = 0  # the byte the last fetch's download resumed at (0: none)

    # --- enrollment -----------------------------------------------------------------------

    @property
    def enrollment(self) -> Enrollment:
        path = self.dir / DEVICE_FILE
        try:
            doc = json.loads(path.read_text())
            return Enrollment(doc["url"], doc["device_id"], doc["token"], doc["cohort"])
        except FileNotFoundError:
            raise UsageError(f"{self.dir}: this device is not enrolled; enroll it first with a token "
                             "from the operator (`cdcca-edge cloud enroll-token`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path} is damaged ({exc}); enroll the device again") from None

    def enroll(self, url: str, token: str) -> Enrollment:
        """Exchange an enrollment token for a device id and token; the cohort's TUF root
        from the answer becomes this device's trust anchor (trust on first use over the
        enrollment token; a device image may ship the root instead: write it to
        ``tuf/root.json`` before enrolling and it is kept)."""
        url = url.rstrip("/")
        doc = self._request("POST", f"{url}/v1/enroll", None, json.dumps({"token": token}).encode(),
                            {"Content-Type": "application/json"})
        enr = Enrollment(url, doc["device_id"], doc["device_token"], doc["cohort"])
        try:
            before = self.enrollment
        except UsageError:
            before = None
        if before is not None and (before.url, before.cohort) != (enr.url, enr.cohort):
            import shutil  # another service or cohort: the old trust anchor is not this one's

            shutil.rmtree(self.dir / "tuf", ignore_errors=True)
        (self.dir / "tuf").mkdir(parents=True, exist_ok=True)
        root = self.dir / "tuf" / "root.json"
        if not root.exists():
            with atomic_file(root) as f:
                f.write(json.dumps(doc["tuf_root"]).encode())
        with atomic_file(self.dir / DEVICE_FILE, mode=0o600) as f:
            f.write(json.dumps({"url": url, "device_id": enr.device_id, "token": enr.token,
                                "cohort": enr.cohort}).encode())
        return enr

    # --- requests -------------------------------------------------------------------------

    def _request(self, method: str, url: str, token: str | None, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
        import urllib3

        try:
            r = _pool(token).request(method, url, body=body, headers=_headers(token, headers))
        except urllib3.exceptions.HTTPError as exc:
            raise SyncError(f"{url}: no answer ({type(exc).__name__}); the request is safe to retry") from None
        if r.status >= 400:
            try:
                detail = json.loads(r.data)["detail"]
                code, msg = detail.get("error", ""), detail.get("message", str(detail))
            except (ValueError, KeyError, TypeError, AttributeError):
                code, msg = "", r.data[:200].decode(errors="replace")
            raise SyncError(f"{method} {url}: HTTP {r.status} {code}: {msg}", r.status, code)
        return json.loads(r.data) if r.data else {}

    def upload(self, bundle: str | Path) -> dict[str, Any]:
        """POST an uplink bundle; returns the service's answer (``stored``: now | already)."""
        enr = self.enrollment
        data = Path(bundle).read_bytes()
        return self._request("POST", f"{enr.url}/v1/uploads", enr.token, data,
                             {"Content-Type": "application/octet-stream"})

    def check(self, identity: str) -> dict[str, Any]:
        """What the service says this device, holding ``identity``, should fetch."""
        import urllib.parse

        enr = self.enrollment
        return self._request("GET", f"{enr.url}/v1/updates?identity={urllib.parse.quote(identity)}", enr.token)

    def report(self, identity: str, healthy: bool) -> None:
        enr = self.enrollment
        self._request("POST", f"{enr.url}/v1/status", enr.token,
                      json.dumps({"identity": identity, "healthy": healthy}).encode(),
                      {"Content-Type": "application/json"})

    # --- TUF ------------------------------------------------------------------------------

    def _updater(self) -> Any:
        from tuf.ngclient import Updater

        enr = self.enrollment
        meta = self.dir / "tuf"
        if not (meta / "root.json").exists():
            raise UsageError(f"{meta}: no trusted root; enroll the device again")
        return Updater(str(meta), f"{enr.url}/v1/tuf/metadata/", str(self.dir / "downloads"),
                       f"{enr.url}/v1/tuf/targets/", fetcher=_tuf_fetcher(enr.token), bootstrap=None)

    def refresh(self) -> Any:
        """Refresh the trusted TUF metadata; returns the updater.

        Raises:
            IntegrityError: the service's metadata is expired, rolled back, badly signed or
                too long (the device keeps what it trusts and stays on its version).
            SyncError: the metadata could not be fetched.
        """
        from tuf.api import exceptions as tufx

        up = self._updater()
        try:
            up.refresh()
        except tufx.RepositoryError as exc:
            raise IntegrityError(f"update metadata refused ({type(exc).__name__}: {exc}); the device stays on "
                                 "its version; if the service's clock or keys changed, ask its operator") from None
        except tufx.DownloadError as exc:
            raise SyncError(f"update metadata could not be fetched ({type(exc).__name__}: {exc}); try again "
                            "later") from None
        return up

    def plan(self, identity: str) -> dict[str, Any] | None:
        """The update a device holding ``identity`` should apply, decided from the signed,
        fresh metadata alone (the service's answer is only a hint: a forged or replayed
        answer can neither roll the device back nor hold it on an old version): None when
        ``identity`` is the latest signed version; else the delta from its version to the
        latest when one is signed, else the latest whole artefact.

        Raises:
            IntegrityError / SyncError: as :meth:`refresh`.
        """
        self.refresh()
        signed = self.signed_targets()
        artifacts = {t["custom"]["to_version"]: (p, t) for p, t in signed.items()
                     if t.get("custom", {}).get("kind") == "artifact"}
        if not artifacts:
            raise IntegrityError("the cohort's signed metadata names no artefact; ask the service's operator")
        latest = max(artifacts)
        held = next((v for v, (_, t) in artifacts.items() if t["custom"]["to_identity"] == identity), None)
        if held == latest:
            return None
        if held is not None:
            for path, t in signed.items():
                c = t.get("custom", {})
                if c.get("kind") == "delta" and (c.get("from_version"), c.get("to_version")) == (held, latest):
                    return {"kind": "delta", "target": path, "from_version": held, "to_version": latest,
                            "from_identity": c["from_identity"], "to_identity": c["to_identity"],
                            "sha256": t["hashes"]["sha256"], "length": t["length"]}
        path, t = artifacts[latest]
        return {"kind": "artifact", "target": path, "to_version": latest, "to_identity": t["custom"]["to_identity"],
                "sha256": t["hashes"]["sha256"], "length": t["length"]}

    def signed_targets(self) -> dict[str, Any]:
        """The targets of the trusted metadata as of the last refresh (ngclient keeps the
        verified targets.json): path -> {length, hashes, custom}."""
        return json.loads((self.dir / "tuf" / "targets.json").read_bytes())["signed"]["targets"]

    def trusted_keys(self) -> list[str]:
        """Hex Ed25519 keys the trusted root gives the targets role: the keys a delta may be
        signed with (the second layer follows the TUF root, rotations included)."""
        root = json.loads((self.dir / "tuf" / "root.json").read_bytes())["signed"]
        return [root["keys"][k]["keyval"]["public"] for k in root["roles"]["targets"]["keyids"]]

    def trust(self) -> Any:
        """The delta trust policy that follows the TUF root: deltas must be signed by a key
        the trusted root gives the targets role."""
        from cdcca_edge.core.trust import Trust

        return Trust(tuple(bytes.fromhex(k) for k in self.trusted_keys()), "the cohort's TUF root")

    def fetch(self, update: dict[str, Any]) -> Path:
        """Download the file an update answer names, verified against the signed TUF
        metadata (length, SHA-256, and the identities it claims). A download that broke
        off resumes from the bytes already received (HTTP Range). Returns the verified
        file, in ``downloads/``.

        Raises:
            IntegrityError: the metadata does not name the target, or its signed claims
                differ from the answer, or the bytes do not match.
        """
        self.resumed_at = 0
        up = self.refresh()
        info = up.get_targetinfo(update["target"])
        if info is None:
            raise IntegrityError(f"{update['target']!r} is not in the cohort's signed metadata; do not apply it")
        claims = info.custom
        for key in ("kind", "to_identity", "from_identity", "to_version"):
            if key in update and claims.get(key) != update.get(key):
                raise IntegrityError(f"the update answer says {key}={update.get(key)!r}, the signed metadata "
                                     f"{claims.get(key)!r}; do not apply it")
        downloads = self.dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        sha = info.hashes["sha256"]
        final = downloads / f"{sha}.{info.path.rsplit('/', 1)[-1]}"
        if final.exists() and self._verified(info, final):
            return final
        part = final.with_name(final.name + ".part")
        self._download(info, part)
        if not self._verified(info, part):
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{info.path}: the bytes do not match the signed length and SHA-256; "
                                 "the partial file was removed, fetch again")
        os.replace(part, final)
        return final

    @staticmethod
    def _verified(info: Any, path: Path) -> bool:
        from tuf.api import exceptions as tufx

        try:
            with open(path, "rb") as f:
                info.verify_length_and_hashes(f)
            return True
        except tufx.LengthOrHashMismatchError:
            return False

    def _download(self, info: Any, part: Path) -> None:
        """Append to ``part`` from where it ends, never past the signed length (endless
        data is cut off)."""
        import urllib3

        enr = self.enrollment
        have = part.stat().st_size if part.exists() else 0
        if have > info.length:
            part.unlink()
            have = 0
        if have == info.length:
            return
        self.resumed_at = have  # where this download started (0: from the beginning)
        kill_at = int(os.environ.get("CDCCA_TEST_KILL_DOWNLOAD_AT", "0")) or None  # test hook: SIGKILL there
        d, _, base = info.path.rpartition("/")
        url = f"{enr.url}/v1/tuf/targets/{d + '/' if d else ''}{info.hashes['sha256']}.{base}"
        headers = _headers(enr.token, {"Range": f"bytes={have}-"} if have else None)
        try:
            r = _pool(enr.token).request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise SyncError(f"{url}: no answer ({type(exc).__name__}); fetch again to resume") from None
        try:
            if r.status >= 400:
                raise SyncError(f"GET {url}: HTTP {r.status}", r.status)
            if have and r.status != 206:  # the server ignored the range: start over
                have = 0
            with open(part, "ab" if have else "wb") as f:
                try:
                    for chunk in r.stream(CHUNK):
                        if have + len(chunk) > info.length:
                            f.close()
                            part.unlink()
                            raise IntegrityError(f"{info.path}: the service sent more than the signed "
                                                 f"{info.length} bytes; refused")
                        if kill_at is not None and have < kill_at <= have + len(chunk):
                            import signal

                            f.write(chunk[:kill_at - have])
                            f.flush()
                            os.fsync(f.fileno())
                            os.kill(os.getpid(), signal.SIGKILL)
                        f.write(chunk)
                        have += len(chunk)
                except urllib3.exceptions.HTTPError as exc:
                    raise SyncError(f"{url}: the download broke off at {have:,} bytes "
                                    f"({type(exc).__name__}); fetch again to resume") from None
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(f"{part}: {exc}") from None
        finally:
            r.release_conn()


def previous_path(model: Path) -> Path:
    """Where :func:`install_artifact` keeps the replaced artefact when asked to."""
    return model.parent / f".{model.name}.previous"


def install_artifact(src: Path, model: Path, identity: str, version: int, keep: bool = False) -> None:
    """Replace ``model`` with the verified whole artefact ``src`` atomically, and start its
    state at ``version``. A GGUF file: a temporary copy beside it, fsync'd, renamed. A
    directory (ONNX, bundle; ``src`` is its pack): unpacked beside it, checked, then
    swapped in by two renames that :func:`cdcca_edge.core.pack.finish_directory_install`
    completes or undoes after a crash. ``keep``: keep the replaced artefact at
    :func:`previous_path` (a hard link for a file) for :func:`restore_artifact`.

    Raises:
        IntegrityError: the bytes do not have ``identity`` (the model is untouched).
        FormatError: a pack that is not a well-formed directory artefact.
    """
    import shutil
    import tempfile

    from cdcca_edge.core.fileio import commit_file

    def start_state(path: Path) -> None:
        adopt_version(path, identity, version)

    if model.is_dir():
        from cdcca_edge.core.pack import finish_directory_install, staging_path, swap_in, unpack_directory

        finish_directory_install(model)
        staged = staging_path(model)
        unpack_directory(src, staged)
        try:
            start_state(staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        swap_in(staged, model, previous_path(model) if keep else None)
        return
    if keep:
        previous_path(model).unlink(missing_ok=True)
        os.link(model, previous_path(model))
    fd, name = tempfile.mkstemp(prefix=f".{model.name}.", dir=model.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, name)
        commit_file(Path(name), model, mode=0o644)
    finally:
        Path(name).unlink(missing_ok=True)
    start_state(model)


def restore_artifact(model: Path, identity: str, version: int | None) -> None:
    """Put back the artefact :func:`install_artifact` kept (``keep=True``), with its
    state at ``identity`` and ``version`` (a whole update that failed its health check).

    Raises:
        UsageError: nothing was kept.
        IntegrityError: the kept bytes do not have ``identity``.
    """
    from cdcca_edge.core.fileio import fsync_dir

    kept = previous_path(model)
    if not kept.exists():
        raise UsageError(f"{kept}: no previous artefact was kept; reinstall the old version by hand")
    if kept.is_dir():
        from cdcca_edge.core.pack import swap_in

        swap_in(kept, model)
    else:
        os.replace(kept, model)
        fsync_dir(model.parent)
    adopt_version(model, identity, version)


def discard_previous(model: Path) -> None:
    """Delete what :func:`install_artifact` kept (the update passed its checks)."""
    import shutil

    kept = previous_path(model)
    if kept.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
    else:
        kept.unlink(missing_ok=True)


def adopt_version(model: Path, identity: str, version: int | None) -> None:
    """Start ``model``'s state afresh at ``identity`` (checked against its bytes) and
    ``version`` (a version the signed metadata gives that identity).

    Raises:
        IntegrityError: the bytes do not have ``identity``.
    """
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import record_export

    record_export(open_artifact(model), identity, -1 if version is None else version)


def version_of(client: SyncClient, identity: str) -> int | None:
    """The cohort version the trusted metadata gives ``identity`` (None: no version)."""
    return next((t["custom"]["to_version"] for t in client.signed_targets().values()
                 if t.get("custom", {}).get("kind") == "artifact" and t["custom"]["to_identity"] == identity), None)


def apply_update(client: SyncClient, model: str | Path, progress: Any = None) -> dict[str, Any]:
    """Bring ``model`` (a GGUF file, ONNX directory or bundle) to the cohort's latest signed version: decide from
    the signed metadata (:meth:`SyncClient.plan`), fetch through TUF, apply (a delta in place with the trust the TUF root gives; a whole artefact by
    atomic replacement), check the identity, report it. Returns what was done.

    Raises:
        IntegrityError: the update was refused, or the result is not the signed identity
            (reported to the service as unhealthy).
    """
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    say = progress or (lambda _m: None)
    model = Path(model)
    identity = current_identity(open_artifact(model))[0]
    client.check(identity)  # a hint only: it makes the service build a delta from an old version
    up = client.plan(identity)  # what to apply: from the signed metadata alone
    if up is None:
        client.report(identity, True)
        return {"update": None, "version": version_of(client, identity), "identity": identity}
    say(f"fetching the {up['kind']} to version {up['to_version']} ({up['length']:,} bytes)")
    path = client.fetch(up)
    if up["kind"] == "delta":
        from cdcca_edge.core.patch import apply_delta

        say("patching in place")
        apply_delta(model, path, trust=client.trust())
    else:
        say("replacing the artefact")
        install_artifact(path, model, up["to_identity"], up["to_version"])
    now = current_identity(open_artifact(model))[0]
    healthy = now == up["to_identity"]
    client.report(now, healthy)
    if not healthy:
        raise IntegrityError(f"{model} has identity {now[:16]} after the update, not the signed "
                             f"{up['to_identity'][:16]}; reported unhealthy")
    path.unlink(missing_ok=True)
    return {"update": up["kind"], "version": up["to_version"], "identity": now, "bytes": up["length"]}
