"""The service's state: cohorts, their published versions, enrollment tokens, devices and
uploads, in SQLAlchemy 2: SQLite in WAL mode by default, PostgreSQL for scale-out
(``--db postgresql://...``, driver psycopg 3). The schema is made and moved by the Alembic
migrations in ``migrations/`` (``open_db`` runs them); these classes mirror them. Tokens
are stored as SHA-256 digests, never in the clear."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

TOKEN_BYTES = 32  # 256-bit bearer tokens


class Base(DeclarativeBase):
    pass


class Cohort(Base):
    """A model line: one device artefact format, its versions, its devices."""

    __tablename__ = "cohorts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    artifact_format: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float, default=time.time)
    # what a round needs (none: the cohort takes uploads but runs no rounds)
    teacher_dir: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    student_dir: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    sign_key: Mapped[str | None] = mapped_column(String(4096), nullable=True)  # a path, never the key


class Version(Base):
    """A published version of a cohort's device artefact (0: the exported student)."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("cohort_id", "number"), UniqueConstraint("cohort_id", "identity"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"))
    number: Mapped[int] = mapped_column(Integer)
    identity: Mapped[str] = mapped_column(String(64))
    artifact_sha256: Mapped[str] = mapped_column(String(64))  # the whole artefact, as a blob
    artifact_size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class EnrollToken(Base):
    __tablename__ = "enroll_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    uses_left: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    enrolled: Mapped[float] = mapped_column(Float, default=time.time)
    identity: Mapped[str | None] = mapped_column(String(64), nullable=True)  # last reported
    healthy: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    status_time: Mapped[float | None] = mapped_column(Float, nullable=True)


class Upload(Base):
    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("device_id", "sha256"),
                      Index("ix_uploads_device_created", "device_id", "created"),
                      Index("ix_uploads_cohort_round", "cohort_id", "round_version"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    artifact_identity: Mapped[str] = mapped_column(String(64))
    n_samples: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    round_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # first used by


class Delta(Base):
    """A published delta between two versions of a cohort."""

    __tablename__ = "deltas"
    __table_args__ = (UniqueConstraint("cohort_id", "from_version", "to_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"))
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[float] = mapped_column(Float, default=time.time)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKEN_PREFIX = "cdcca_"  # a letter first: a token is never read as a command-line option


def new_token() -> str:
    """A bearer token: the prefix (recognisable in logs and secret scanners) and 256
    random bits, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def database_url(data_dir: Path, url: str | None = None) -> str:
    """``url`` as given (a PostgreSQL URL names the psycopg 3 driver), else the embedded
    default's SQLite file in ``data_dir``."""
    if url is None:
        return f"sqlite:///{(data_dir / 'state.sqlite3').resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


_ENGINES: dict[str, sessionmaker[Session]] = {}


def open_db(url: str) -> sessionmaker[Session]:
    """Session factory for ``url``, its schema migrated to the newest revision (once per
    process). SQLite runs in WAL mode with synchronous=FULL: a committed upload survives a
    power cut, not only a crash."""
    if url in _ENGINES:
        return _ENGINES[url]
    sqlite = url.startswith("sqlite")
    engine: Engine = create_engine(url, future=True, **({} if sqlite else {"pool_size": 20, "max_overflow": 20,
                                                                          "pool_pre_ping": True}))
    if sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # noqa: ANN001
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()
    migrate(engine)
    _ENGINES[url] = sessionmaker(engine, expire_on_commit=False)
    return _ENGINES[url]


def migrate(engine: Engine) -> None:
    """Run the Alembic migrations up to the newest revision. Processes that start together
    (API processes, workers) take turns: a PostgreSQL advisory lock, a lock file beside a
    SQLite database."""
    import contextlib
    import fcntl

    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with contextlib.ExitStack() as stack:
        if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            lock = stack.enter_context(open(f"{engine.url.database}.migrate-lock", "a"))
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7263100114)")  # any fixed key: ours
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def schema_revision(sessions: sessionmaker[Session]) -> str | None:
    """The Alembic revision the database is at."""
    from sqlalchemy import text

    with sessions() as s:
        return s.execute(text("SELECT version_num FROM alembic_version")).scalar()


def cohort_named(s: Session, name: str) -> Cohort | None:
    return s.scalar(select(Cohort).where(Cohort.name == name))


def latest_version(s: Session, cohort_id: int) -> Version | None:
    """The cohort's newest published version (every cohort has its version 0)."""
    return s.scalar(select(Version).where(Version.cohort_id == cohort_id).order_by(Version.number.desc()).limit(1))


def row_counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Rows per table (tests check that a refused request changed none)."""
    with sessions() as s:
        return {t.__tablename__: s.scalar(select(func.count()).select_from(t)) or 0
                for t in (Cohort, Version, EnrollToken, Device, Upload, Delta)}
