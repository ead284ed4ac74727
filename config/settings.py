"""Settings, read once from the environment (and a ``.env`` file) when first asked for.

Reading is lazy so that tests and embedding applications can set the environment first;
``reset_settings()`` forgets the cached values. A ``.env`` file in the working directory is loaded
without overriding variables that are already set. Every variable is listed, with its default, in
``.env.example``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_lock = threading.Lock()
_cached: Settings | None = None

#: ``MEMORY_EMBEDDING_BACKEND``: ``auto`` is onnx once the model is prepared, else torch.
EMBEDDING_BACKENDS = ("auto", "onnx", "torch")
#: ``MEMORY_EMBEDDING_PRECISION``: the weights the onnx backend runs the packaged model with.
EMBEDDING_PRECISIONS = ("int8", "fp32")


class SettingsError(ValueError):
    """An environment variable holds a value of the wrong kind."""


@dataclass(frozen=True)
class Settings:
    """Every setting of the memory layer; built by ``Settings.from_env()`` or ``get_settings()``."""

    app_env: str = "local"
    memory_driver: str = "sqlite"
    sqlite_path: str = "storage/memory.sqlite3"
    sqlite_busy_timeout_ms: int = 5_000
    sqlite_mmap_bytes: int = 1 << 30
    database_url: str = "postgresql://postgres@127.0.0.1:5432/memory"
    pg_pool_min_size: int = 1
    pg_pool_max_size: int = 10
    pg_pool_timeout: float = 5.0
    pg_connect_timeout: float = 5.0
    pg_exact_scan_max_rows: int = 5_000
    pg_access_flush_seconds: float = 1.0
    automem_url: str = "http://127.0.0.1:8001"
    automem_api_token: str = ""
    automem_connect_timeout: float = 5.0
    automem_read_timeout: float = 25.0
    automem_max_tries: int = 3
    automem_backoff_seconds: float = 0.5
    automem_enrichment_window: float = 0.5
    automem_batch_size: int = 100
    automem_content_soft_limit: int = 500
    automem_access_flush_seconds: float = 1.0
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_backend: str = "auto"
    embedding_precision: str = "int8"
    embedding_threads: int = 1
    model_dir: str = ""
    embedding_batch_size: int = 64
    query_cache_size: int = 1_024
    vector_cache_max_vectors: int = 2_000_000
    #: A driver verb slower than this many milliseconds is logged at WARNING; 0: never.
    slow_operation_ms: int = 1_000
    #: The SQLite vector cache's budget in bytes, overheads included; 0: the bytes of
    #: ``vector_cache_max_vectors`` vectors of the model's size.
    vector_cache_max_bytes: int = 0
    soft_delete_retention_days: float = 30.0
    #: 0: chosen per driver by the cores (``aio.default_workers``).
    async_workers: int = 0
    async_embed_in_process: bool = False
    # -- the service (``python -m app serve``) --
    keys_database: str = ""
    service_host: str = "127.0.0.1"
    service_port: int = 8080
    service_max_body_bytes: int = 1_048_576
    service_graceful_timeout: float = 30.0

    @property
    def is_production(self) -> bool:
        return self.app_env.lower() == "production"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``), falling back to the defaults."""
        source = os.environ if env is None else env
        defaults = cls()

        def text(name: str, default: str) -> str:
            return source.get(name, "").strip() or default

        def number(name: str, default: float, kind: type = int) -> float:
            raw = source.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                kind_name = "a whole number" if kind is int else "a number"
                raise SettingsError(f"{name} must be {kind_name} (got {raw!r})") from None
            if value < 0:
                raise SettingsError(f"{name} must not be negative (got {raw!r})")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = source.get(name, "").strip().lower()
            if not raw:
                return default
            if raw in ("true", "yes", "on"):
                return True
            if raw in ("false", "no", "off"):
                return False
            if raw.isdigit():  # 1 / 0, as shell scripts write them
                return int(raw) != 0
            raise SettingsError(f"{name} must be true or false (got {raw!r})")

        return cls(
            app_env=text("APP_ENV", defaults.app_env),
            memory_driver=text("MEMORY_DRIVER", defaults.memory_driver).lower(),
            sqlite_path=text("MEMORY_SQLITE_PATH", defaults.sqlite_path),
            sqlite_busy_timeout_ms=int(
                number("MEMORY_SQLITE_BUSY_TIMEOUT_MS", defaults.sqlite_busy_timeout_ms)
            ),
            sqlite_mmap_bytes=int(
                number("MEMORY_SQLITE_MMAP_BYTES", defaults.sqlite_mmap_bytes)),
            database_url=text("DATABASE_URL", defaults.database_url),
            pg_pool_min_size=int(number("MEMORY_PG_POOL_MIN_SIZE", defaults.pg_pool_min_size)),
            pg_pool_max_size=int(
                number("MEMORY_PG_POOL_MAX_SIZE", defaults.pg_pool_max_size)) or 1,
            pg_pool_timeout=float(
                number("MEMORY_PG_POOL_TIMEOUT", defaults.pg_pool_timeout, float)),
            pg_connect_timeout=float(
                number("MEMORY_PG_CONNECT_TIMEOUT", defaults.pg_connect_timeout, float)),
            pg_exact_scan_max_rows=int(
                number("MEMORY_PG_EXACT_SCAN_MAX_ROWS", defaults.pg_exact_scan_max_rows)),
            pg_access_flush_seconds=float(number(
                "MEMORY_PG_ACCESS_FLUSH_SECONDS", defaults.pg_access_flush_seconds, float)),
            automem_url=text("AUTOMEM_URL", text("AUTOMEM_ENDPOINT", defaults.automem_url)),
            automem_api_token=text("AUTOMEM_API_TOKEN", text("AUTOMEM_API_KEY", "")),
            automem_connect_timeout=float(number("AUTOMEM_CONNECT_TIMEOUT",
                                                 defaults.automem_connect_timeout, float)),
            automem_read_timeout=float(number("AUTOMEM_READ_TIMEOUT",
                                              defaults.automem_read_timeout, float)),
            automem_max_tries=int(number("AUTOMEM_MAX_TRIES", defaults.automem_max_tries)) or 1,
            automem_backoff_seconds=float(number("AUTOMEM_BACKOFF_SECONDS",
                                                 defaults.automem_backoff_seconds, float)),
            automem_enrichment_window=float(number("AUTOMEM_ENRICHMENT_WINDOW",
                                                   defaults.automem_enrichment_window, float)),
            automem_batch_size=int(number("AUTOMEM_BATCH_SIZE", defaults.automem_batch_size))
            or 1,
            automem_content_soft_limit=int(number("AUTOMEM_CONTENT_SOFT_LIMIT",
                                                  defaults.automem_content_soft_limit)) or 500,
            automem_access_flush_seconds=float(number("AUTOMEM_ACCESS_FLUSH_SECONDS",
                                                      defaults.automem_access_flush_seconds,
                                                      float)),
            embedding_model=text("MEMORY_EMBEDDING_MODEL", defaults.embedding_model),
            embedding_backend=_choice(source, "MEMORY_EMBEDDING_BACKEND", EMBEDDING_BACKENDS,
                                      defaults.embedding_backend),
            embedding_precision=_choice(source, "MEMORY_EMBEDDING_PRECISION",
                                        EMBEDDING_PRECISIONS, defaults.embedding_precision),
            embedding_threads=int(
                number("MEMORY_EMBEDDING_THREADS", defaults.embedding_threads)),
            model_dir=text("MEMORY_MODEL_DIR", defaults.model_dir),
            embedding_batch_size=int(
                number("MEMORY_EMBEDDING_BATCH_SIZE", defaults.embedding_batch_size)
            ) or 1,
            query_cache_size=int(number("MEMORY_QUERY_CACHE_SIZE", defaults.query_cache_size)),
            slow_operation_ms=int(
                number("MEMORY_SLOW_OPERATION_MS", defaults.slow_operation_ms)),
            vector_cache_max_vectors=int(
                number("MEMORY_VECTOR_CACHE_MAX_VECTORS", defaults.vector_cache_max_vectors)
            ),
            vector_cache_max_bytes=int(
                number("MEMORY_VECTOR_CACHE_MAX_BYTES", defaults.vector_cache_max_bytes)
            ),
            soft_delete_retention_days=float(
                number("MEMORY_SOFT_DELETE_RETENTION_DAYS", defaults.soft_delete_retention_days,
                       float)
            ),
            async_workers=int(number("MEMORY_ASYNC_WORKERS", defaults.async_workers)),
            async_embed_in_process=flag("MEMORY_ASYNC_EMBED_IN_PROCESS",
                                        defaults.async_embed_in_process),
            keys_database=text("MEMORY_KEYS_DATABASE", defaults.keys_database).lower(),
            service_host=text("MEMORY_SERVICE_HOST", defaults.service_host),
            service_port=int(number("MEMORY_SERVICE_PORT", defaults.service_port)),
            service_max_body_bytes=int(
                number("MEMORY_SERVICE_MAX_BODY_BYTES", defaults.service_max_body_bytes)) or 1,
            service_graceful_timeout=float(number("MEMORY_SERVICE_GRACEFUL_TIMEOUT",
                                                  defaults.service_graceful_timeout, float)),
        )

    def __repr__(self) -> str:
        # Secrets stay out of logs and tracebacks that print the settings.
        return (
            f"Settings(app_env={self.app_env!r}, memory_driver={self.memory_driver!r}, "
            f"sqlite_path={self.sqlite_path!r}, embedding_model={self.embedding_model!r})"
        )


def _choice(source: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = source.get(name, "").strip().lower() or default
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")
    return value


def get_settings() -> Settings:
    """The process's settings: ``.env`` and the environment, read on the first call."""
    global _cached
    with _lock:
        if _cached is None:
            _load_dotenv()
            _cached = Settings.from_env()
        return _cached


def reset_settings() -> None:
    """Forget the cached settings; the next ``get_settings()`` reads the environment again."""
    global _cached
    with _lock:
        _cached = None


def _load_dotenv() -> None:
    env_file = Path.cwd() / ".env"
    if env_file.is_file():
        from dotenv import load_dotenv

        load_dotenv(env_file, override=False)


#: Shown in place of a connection string that libpq cannot read: its own message would quote the
#: string, and with it any password, so neither is ever printed.
UNPARSABLE_CONNINFO = "<not a valid PostgreSQL connection string (value not shown)>"


class ConninfoError(ValueError):
    """A connection string libpq cannot read; the message never quotes the string."""


def parse_conninfo(url: str) -> dict[str, str]:
    """``url`` read by libpq's own rules (URL or ``key=value`` form, ``?password=`` included).

    Raises ``ConninfoError`` (saying how to write one, never quoting ``url``) when libpq cannot
    read it, or when a raw ``@`` in the password made libpq read part of it as the host.
    """
    params = _raw_params(url)
    if params is None:
        raise ConninfoError(
            "DATABASE_URL is not a valid PostgreSQL connection string: write it as "
            "postgresql://USER:PASSWORD@HOST:PORT/DBNAME or as 'host=HOST dbname=DBNAME "
            "user=USER', with @ : / and spaces in the password percent-encoded (%40 %3A %2F "
            "%20)")
    if "@" in params.get("host", ""):
        raise ConninfoError(
            "DATABASE_URL has a raw @ in its password (libpq read part of the password as the "
            "host): percent-encode it as %40")
    if not re.fullmatch(r"[0-9,]*", params.get("port", "")):
        raise ConninfoError("DATABASE_URL's port must be a number (value not shown)")
    return params


def redact_url(url: str) -> str:
    """``url`` as libpq reads it, with any password shown as ``***``: safe to print.

    The URL and keyword forms both come out as a ``postgresql://`` URL; a string libpq cannot
    read comes out as ``UNPARSABLE_CONNINFO``, never echoed.
    """
    return _display_url(url, "***")


def strip_password(url: str) -> str:
    """``url`` without its password, for a command a user will run with PGPASSWORD set."""
    return _display_url(url, None)


def redact_secrets(text: str, url: str) -> str:
    """``text`` (say, a libpq message about ``url``) with every secret of ``url`` replaced.

    The password (raw, percent-encoded, and each longer piece of it between separators) and the
    string itself are replaced by ``***``; when ``url`` cannot be parsed its secrets are unknown,
    so the whole text is withheld.
    """
    from urllib.parse import quote

    params = _raw_params(url)
    if params is None:
        return UNPARSABLE_CONNINFO + " (the message is withheld: it may quote it)"
    secrets = {url}
    password = params.get("password", "")
    if password:
        secrets.update({password, quote(password, safe=""), quote(password)})
        # A message may quote a piece of a password cut where libpq splits strings.
        secrets.update(piece for piece in re.split(r"[\s@:/?&=]+", password) if len(piece) >= 4)
    host = params.get("host", "")
    if "@" in host:  # what followed a raw @ in the password
        secrets.add(host.rsplit("@", 1)[0])
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _raw_params(url: str) -> dict[str, str] | None:
    """libpq's reading of ``url`` without ``parse_conninfo``'s checks; None if it has none.

    None rather than an exception: libpq's exception quotes the string, and one raised from here
    would carry it along as the ``__context__`` of whatever the caller raises next.
    """
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - any refusal means the same: unreadable
        return None
    return {key: str(value) for key, value in params.items() if value is not None}


def _display_url(url: str, password: str | None) -> str:
    from urllib.parse import quote, urlencode

    params = _raw_params(url)
    if params is None:
        return UNPARSABLE_CONNINFO
    user = params.pop("user", "")
    had_password = params.pop("password", None) is not None
    host = params.pop("host", "")
    if "@" in host:  # a raw @ in the password: what came before it is the password's tail
        host = host.rsplit("@", 1)[1]
    port = params.pop("port", "")
    if not re.fullmatch(r"[0-9,]*", port):  # libpq would quote it in its refusal
        port = "***"
    dbname = params.pop("dbname", "")
    if "," in host or "/" in host or "," in port:  # several hosts, or a socket directory
        params = {"host": host, **({"port": port} if port else {}), **params}
        host = port = ""
    credentials = quote(user, safe="")
    if had_password and password is not None:
        credentials += ":" + password
    netloc = (credentials + "@" if credentials else "") + quote(host, safe="") + (
        f":{port}" if port else "")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"
