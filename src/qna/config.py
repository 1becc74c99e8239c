"""Every setting qna reads, with its default. Only the container reads these.

Values come from the environment, then from a `.env` file in the working directory.
The README's settings table is this class, in words; keep them together.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
from dotenv.parser import parse_stream
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# Defined with the other errors (an adapter raises it too); qna.config's as well.
from qna.domain.errors import ConfigurationError as ConfigurationError
from qna.domain.model import MAX_MODEL_LENGTH

DEFAULT_MODEL = "gpt-5-mini"
# Upper bounds for durations, in seconds: past them a setting is a typo, and the
# dates and timers built from it would overflow.
_DAY = 86_400
_TEN_YEARS = 10 * 365 * _DAY
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The package each family of rate-limit storage schemes talks through (redis+sentinel
# through redis, ...); qna ships none of them.
_RATE_LIMIT_DRIVERS = {
    "redis": "redis",
    "valkey": "valkey",
    "memcached": "pymemcache",
    "mongodb": "pymongo",
}


def default_database_path() -> Path:
    """The embedded SQLite file: ~/.local/share/qna/qna.db on Linux (XDG),
    ~/Library/Application Support/qna/qna.db on macOS, %LOCALAPPDATA%\\qna on Windows."""
    return Path(platformdirs.user_data_dir("qna", appauthor=False)) / "qna.db"


def _http_url_problem(url: str) -> str | None:
    """What keeps `url` from being an absolute http(s) URL with a host, if anything.
    Never quotes the URL: it may hold a password."""
    if any(char.isspace() or not char.isprintable() for char in url):
        return "it contains spaces or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:  # what it refuses is a bracketed host that is not an IP address
        return "its [bracketed] host is not an IPv6 address"
    try:
        parts.port  # noqa: B018 -- checked only when it is read
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if parts.scheme not in ("http", "https"):
        return "it is not an http:// or https:// URL"
    if not parts.hostname:
        return "it names no host"
    return None


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9._-]+")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _origin(text: str) -> str:
    """`text` as a browser writes it in an Origin header (scheme://host[:port], lower
    case, no default port), or ValueError saying why it is not an origin."""
    if text == "*":
        return text
    problem = _http_url_problem(text)
    if problem:  # not quoted: it may hold control characters
        raise ValueError(f"an entry is not an origin ({problem}); expected e.g. {_ORIGIN_EXAMPLE}")
    parts = urlsplit(text)
    shown = text[:100]
    after_scheme = text.split("://", 1)[1] if "://" in text else text
    if any(char in after_scheme for char in "/?#"):
        # Browsers send none, not even "/": such an entry would never match.
        raise ValueError(
            f"{shown} has a path, query or fragment; an origin is scheme://host[:port], "
            f"e.g. {_ORIGIN_EXAMPLE}"
        )
    if "@" in parts.netloc:
        raise ValueError(f"{shown} has user information; an origin is scheme://host[:port]")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        host = f"[{host}]"
    elif not host.isascii():
        raise ValueError(f"{shown}: write the host in its xn-- form, as browsers send it")
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{shown} is not an exact origin (no patterns; * alone allows all)")
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


_ORIGIN_EXAMPLE = "https://app.example.com"


def _dotenv_names(env_files: object, encoding: str) -> frozenset[str]:
    """The names set in the .env file(s), upper-cased (for `misread_variables`), once
    each line is known to be one python-dotenv reads. A line it cannot read is passed
    over with a warning of its own (not qna's one line), and the settings on it
    silently take their defaults: an unclosed quote swallowed DATABASE_URL, and the
    records went to the default file. `env_files`: one path or several, as
    pydantic-settings takes them. Read from a regular file only: a named pipe (a
    secrets tool's) is read once."""
    names: set[str] = set()
    for env_file in env_files if isinstance(env_files, list | tuple) else [env_files]:
        if not isinstance(env_file, str | os.PathLike) or not Path(env_file).is_file():
            continue
        with open(env_file, encoding=encoding) as stream:
            for binding in parse_stream(stream):
                if binding.error:
                    raise ConfigurationError(
                        f"The .env file cannot be read: line {binding.original.line} is not "
                        "NAME=value (is a quote left open?)."
                    )
                if binding.key is not None:
                    names.add(binding.key.upper())
    return frozenset(names)


_URL_SETTINGS = frozenset({"database_url", "openai_base_url", "rate_limit_storage"})


def without_secrets(url: str, *, database: bool = False) -> str:
    """`url` with its password, and its query (where gateways take keys), starred.

    A `database` URL is split as SQLAlchemy splits it, not as a web URL: it takes a
    password with an unencoded "#", "/" or "?" (`postgresql://u:s3cr#t/pw@db/qna`
    works), which urlsplit read as the end of the host, and the password was shown.
    """
    if database:
        from sqlalchemy.engine import make_url  # imported when asked: the CLI starts fast
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            return "(not a database URL)"  # nothing of it is known not to be a secret
        shown = parsed.set(query={}).render_as_string(hide_password=True)
        return f"{shown}?***" if parsed.query else shown
    parts = urlsplit(url)
    if parts.password is None and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    return parts._replace(netloc=netloc, query="***" if parts.query else "").geturl()


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """qna's settings: from keyword arguments (by a setting's name, `database_url=`, or
    its variable's, `DATABASE_URL=`), else the environment, else `.env`, else defaults.
    A wrong value is a `qna.ConfigurationError` naming its variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # Not populate_by_name: pydantic-settings would then read each field's own name
        # from the environment and .env too (MODEL=, LOG_LEVEL=: other programs' common
        # variables). A setting given by its field name is renamed in __init__ instead.
        case_sensitive=False,
    )

    # Seen by type checkers too: the settings' variable names (DATABASE_URL=) and their
    # own in any case are all taken, which no signature of fields can say; a name that
    # is none of them is a TypeError when called.
    def __init__(self, **values: Any) -> None:
        # A name that is no setting is a TypeError, as for any Python function:
        # ignored, a misspelt `database_url` would send the records to the default
        # database. (`extra="ignore"` is for .env files: they hold other programs'
        # variables too.) pydantic-settings' own arguments start with "_".
        given = [setting_field(n, caller="Settings()") for n in values if n[:1] != "_"]
        # One of two names for a setting (model=, QNA_MODEL=) was silently dropped.
        twice = sorted({field for field in given if given.count(field) > 1})
        if twice:
            raise TypeError(f"Settings() got the setting {twice[0]!r} twice, by two of its names")
        # Settings built directly (`qna.Settings(...)`) refuse a value as every
        # entrypoint does: with the error a caller of qna catches, naming the variable.
        encoding = values.get("_env_file_encoding") or "UTF-8"
        try:
            _dotenv_names(values.get("_env_file", ".env"), encoding)  # its lines checked
            super().__init__(**_by_variable(values))
        except ValidationError as exc:
            raise ConfigurationError(describe_invalid_settings(exc)) from exc
        except UnicodeDecodeError as exc:
            # Saved as Latin-1 (say) by an editor; unchecked, an internal error.
            raise ConfigurationError(
                f"The .env file is not {encoding} text: byte "
                f"{exc.object[exc.start]:#04x} at offset {exc.start}."
            ) from None
        except OSError as exc:
            # Unreadable (its permissions, a disk error): a setting to fix, not a bug.
            raise ConfigurationError(
                f"The .env file cannot be read: {exc.strerror or exc}."
            ) from None

    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    db_pool_size: int = Field(10, ge=1, le=200, validation_alias=_env("QNA_DB_POOL_SIZE"))
    db_connect_timeout_s: float = Field(
        # Bounded as the LLM's timeouts are; libpq's connect_timeout is a C int, and
        # past it PostgreSQL refused every connection (read as an outage, exit 6).
        5.0,
        gt=0,
        le=_DAY,
        allow_inf_nan=False,
        validation_alias=_env("QNA_DB_CONNECT_TIMEOUT_S"),
    )
    # PostgreSQL only; 0 turns it off. Every statement of an ask takes milliseconds.
    db_statement_timeout_s: float = Field(
        # PostgreSQL's own upper bound is 2147483647 ms.
        10.0,
        ge=0,
        le=2_147_483,
        allow_inf_nan=False,
        validation_alias=_env("QNA_DB_STATEMENT_TIMEOUT_S"),
    )

    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_env("OPENAI_BASE_URL"))
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        max_length=MAX_MODEL_LENGTH,
        validation_alias=_env("QNA_MODEL"),
    )
    llm_client: Literal["openai", "http"] = Field("openai", validation_alias=_env("QNA_LLM_CLIENT"))
    llm_connect_timeout_s: float = Field(
        5.0, gt=0, le=_DAY, allow_inf_nan=False, validation_alias=_env("QNA_LLM_CONNECT_TIMEOUT_S")
    )
    llm_timeout_s: float = Field(
        60.0, gt=0, le=_DAY, allow_inf_nan=False, validation_alias=_env("QNA_LLM_TIMEOUT_S")
    )
    llm_deadline_s: float = Field(
        120.0, gt=0, le=_DAY, allow_inf_nan=False, validation_alias=_env("QNA_LLM_DEADLINE_S")
    )
    llm_max_attempts: int = Field(4, ge=1, le=20, validation_alias=_env("QNA_LLM_MAX_ATTEMPTS"))

    max_question_length: int = Field(
        4000, ge=1, le=1_000_000, validation_alias=_env("QNA_MAX_QUESTION_LENGTH")
    )
    cache_ttl_s: float = Field(
        0.0, ge=0, le=_TEN_YEARS, allow_inf_nan=False, validation_alias=_env("QNA_CACHE_TTL")
    )

    idempotency_ttl_s: float = Field(
        86400.0,
        gt=0,
        le=_TEN_YEARS,
        allow_inf_nan=False,
        validation_alias=_env("QNA_IDEMPOTENCY_TTL_S"),
    )
    idempotency_wait_s: float = Field(
        30.0, ge=0, le=_DAY, allow_inf_nan=False, validation_alias=_env("QNA_IDEMPOTENCY_WAIT_S")
    )

    max_body_bytes: int = Field(65536, ge=1024, validation_alias=_env("QNA_MAX_BODY_BYTES"))
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False, validation_alias=_env("QNA_BODY_TIMEOUT_S")
    )
    send_timeout_s: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False, validation_alias=_env("QNA_SEND_TIMEOUT_S")
    )
    api_tokens: SecretStr | None = Field(None, validation_alias=_env("QNA_API_TOKENS"))
    rate_limit: str = Field("", validation_alias=_env("QNA_RATE_LIMIT"))
    rate_limit_storage: str = Field("memory://", validation_alias=_env("QNA_RATE_LIMIT_STORAGE"))
    cors_origins: str = Field("", validation_alias=_env("QNA_CORS_ORIGINS"))
    allowed_hosts: str = Field("", validation_alias=_env("QNA_ALLOWED_HOSTS"))
    trusted_proxies: int = Field(0, ge=0, le=10, validation_alias=_env("QNA_TRUSTED_PROXIES"))
    log_level: str = Field("INFO", validation_alias=_env("QNA_LOG_LEVEL"))

    @field_validator("*", mode="before")
    @classmethod
    def _a_number_is_no_bool(cls, value: object, info: ValidationInfo) -> object:
        # True is 1 to Python, and pydantic took it: llm_max_attempts=True was one
        # attempt, and cache_ttl_s=True a cache of a second.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("expected a number, not True or False")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().upper() in _LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")

    @field_validator("llm_client", mode="before")
    @classmethod
    def _client_in_any_case(cls, value: object) -> object:
        # As QNA_LOG_LEVEL is read: `QNA_LLM_CLIENT=HTTP` names a client, not a typo.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("model", mode="before")
    @classmethod
    def _model_name(cls, value: object) -> object:
        # Sent with every ask and stored with every record: "   " or a name with a
        # newline in it is a slip in a .env file, not a model.
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not value.isprintable():
            raise ValueError("it contains a control character")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _parsable_rate_limit(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many  # flask-limiter's own parser; imported late

            try:
                limits = parse_many(value)
            except ValueError:
                raise ValueError(
                    'not a rate limit such as "60/minute" or "10 per second; 1000/day"'
                ) from None
            # "0/minute" refused every request (429s for ever), where 0 elsewhere means
            # off: a limit of nothing is a mistake, said as one.
            if any(limit.amount < 1 for limit in limits):
                raise ValueError(
                    "a limit of 0 requests refuses every request; leave it empty to set no limit"
                )
        return value

    @field_validator("rate_limit_storage")
    @classmethod
    def _usable_rate_limit_storage(cls, value: str) -> str:
        # Checked here, not left to flask-limiter: it refuses a storage it cannot use
        # only inside each `qna serve` worker, which then dies with a traceback.
        # Nothing is connected to; only the scheme and its driver package are checked.
        if not value.strip():
            return "memory://"  # as flask-limiter reads an empty one
        scheme = urlsplit(value.strip()).scheme.lower()
        if scheme == "memory":
            return value
        from limits import storage  # imported late, as for QNA_RATE_LIMIT

        # flask-limiter's storages: the synchronous ones (not limits' async+ schemes).
        synchronous = (
            storage.MemoryStorage,
            storage.RedisStorage,
            storage.RedisClusterStorage,
            storage.RedisSentinelStorage,
            storage.MemcachedStorage,
            storage.MongoDBStorage,
        )
        if not any(scheme in (kind.STORAGE_SCHEME or []) for kind in synchronous):
            raise ValueError(
                "not a rate-limit storage such as memory://, redis://host:6379 "
                "or memcached://host:11211"
            )
        driver = _RATE_LIMIT_DRIVERS.get(scheme.split("+")[0])
        # find_spec looks for the package without importing it (and its TLS stack).
        if driver is not None and importlib.util.find_spec(driver) is None:
            raise ValueError(f"{scheme}:// needs the {driver} package: pip install {driver}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: str) -> str:
        if not value.strip():
            return ""
        origins = [_origin(item.strip()) for item in value.split(",") if item.strip()]
        # Set to open the API to a front-end: a value that lists none is a slip.
        if not origins:
            raise ValueError(f"lists no origin; expected e.g. {_ORIGIN_EXAMPLE}, or *")
        if "*" in origins and len(origins) > 1:
            raise ValueError("* allows every origin: give it alone, or list exact origins")
        return ",".join(dict.fromkeys(origins))

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        names = [item.strip().lower().rstrip(".") for item in value.split(",") if item.strip()]
        if names == ["*"] or not value.strip():
            return ",".join(names)
        if not names:
            raise ValueError("lists no name; expected e.g. qna.example.com, or *")
        for name in names:
            bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
            if not (_HOST_NAME.fullmatch(bare) or _is_ip_address(bare)):
                raise ValueError(
                    f"{name!r} is not a host name (no scheme, port or pattern; * alone "
                    "answers to any)"
                )
        return ",".join(dict.fromkeys(n.strip("[]") for n in names))

    @field_validator("openai_base_url")
    @classmethod
    def _usable_base_url(cls, value: str | None) -> str | None:
        # Refused here, with the other settings: left to the LLM clients, `http://[::1`
        # was an internal error, and `http://` was asked (and stored as failed).
        if value is None:
            return None
        value = value.strip()
        problem = _http_url_problem(value)
        if problem:
            raise ValueError(f"{problem}; expected a URL such as http://localhost:11434/v1")
        return value

    @field_validator("database_url")
    @classmethod
    def _sqlite_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url  # imported late: `qna --help` is quick
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            return value  # not a URL at all: refused, so worded, where the engine is built
        if url.get_backend_name() != "sqlite":
            return value
        # An in-memory SQLite database lives as long as one connection: `qna ask`
        # answered and lost the record on exit, and in a Client each thread's
        # connection had a database of its own, without the table.
        if url.database in (None, "", ":memory:"):
            raise ValueError(
                "an in-memory SQLite database keeps nothing; name a file, e.g. sqlite:///qna.db"
            )
        # sqlite3 does not expand `~`: sqlite:///~/qna.db opened ./~/qna.db.
        if url.database.startswith("~"):
            url = url.set(database=os.path.expanduser(url.database))
            return url.render_as_string(hide_password=False)
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() end up in logs and tracebacks: the URLs' passwords (and an
        # LLM gateway's key in a query) are shown as the keys and tokens are, starred.
        for name, value in super().__repr_args__():
            if name in _URL_SETTINGS and isinstance(value, str):
                value = without_secrets(value, database=name == "database_url")
            yield name, value

    @field_validator(
        "database_url", "openai_base_url", "openai_api_key", "api_tokens", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `DATABASE_URL=` in a .env file means "not set", not "the empty URL"; and
        # "sqlite:///qna.db " (or with a \r) is qna.db, not a file named with a space.
        # (Tokens are stripped one by one when split; an API key, when it is checked.)
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("api_tokens")
    @classmethod
    def _lists_a_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        tokens = _split_tokens(value)
        # Set to close the API: a value that lists no token (",") must not leave it open.
        if not tokens:
            raise ValueError("lists no token; expected comma-separated bearer tokens")
        if not all(token.isascii() and token.isprintable() for token in tokens):
            # A header's bytes are read as Latin-1: a UTF-8 client's token would never match.
            raise ValueError("a token is not printable ASCII, as bearer tokens are (RFC 6750)")
        return value

    @field_validator("openai_api_key", mode="before")
    @classmethod
    def _sendable_api_key(cls, value: object) -> object:
        # It travels in an Authorization header, which holds printable ASCII only:
        # a key with an ellipsis or a space in it failed each ask as an internal error
        # (or as "unreachable", after every retry), leaving the question pending.
        # A .env saved with Windows line ends leaves a \r at the end: stripped.
        if not isinstance(value, str):
            return value
        value = value.strip()
        if not all("!" <= char <= "~" for char in value):
            # Never quoted: it is a secret.
            raise ValueError(
                "it contains a space, a control character or a non-ASCII character, "
                "which an API key cannot hold"
            )
        return value

    @property
    def tokens(self) -> list[str]:
        return _split_tokens(self.api_tokens) if self.api_tokens is not None else []

    @property
    def cors_origin_list(self) -> list[str]:
        """The origins a browser may call the API from: exact origins, or ["*"]."""
        return self.cors_origins.split(",") if self.cors_origins else []

    @property
    def abandon_after_s(self) -> float:
        """When a pending record counts as abandoned: well past any ask's deadline."""
        return self.llm_deadline_s + 60

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+pysqlite:///{default_database_path()}"


def describe_invalid_settings(exc: ValidationError) -> str:
    """One line naming the environment variable that holds a wrong value."""
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    info = Settings.model_fields.get(field)
    alias = getattr(info.validation_alias, "choices", [field]) if info else [field]
    name = str(alias[0]).upper() if alias and alias[0] else "a setting"
    # A validator's own words, without the "Value error, " pydantic puts before them.
    error = first.get("ctx", {}).get("error")
    reason = str(error) if first["type"] == "value_error" and error else first["msg"]
    return f"{name} is invalid: {reason}."


@functools.cache
def _setting_fields() -> dict[str, str]:
    """Each setting's field, by its name (`database_url`) and its variable's (`DATABASE_URL`)."""
    fields = {name: name for name in Settings.model_fields}
    for name, info in Settings.model_fields.items():
        for alias in getattr(info.validation_alias, "choices", []):
            fields[str(alias)] = name
    return fields


def _by_variable(values: dict[str, Any]) -> dict[str, Any]:
    """`values` under their variables' names (`qna_model`, not `model`), which are what
    Settings reads; pydantic-settings' own arguments (`_env_file`) as they are."""
    renamed: dict[str, Any] = {}
    for name, value in values.items():
        if name[:1] == "_":
            renamed[name] = value
            continue
        info = Settings.model_fields[setting_field(name, caller="Settings()")]
        renamed[str(info.validation_alias.choices[-1])] = value  # type: ignore[union-attr]
    return renamed


# Names people give qna's settings from elsewhere: the openai SDK before 1.0 read the
# base URL from OPENAI_API_BASE.
_FORMER_NAMES = {"OPENAI_API_BASE": "OPENAI_BASE_URL"}


def misread_variables(env_file: object = ".env") -> list[str]:
    """A line for each variable, in the environment or the .env file, that looks meant
    for a setting but is not its name (QNA_API_TOKEN for QNA_API_TOKENS): qna does not
    read it, and a typo in a token or a rate limit would leave the API open unnoticed.

    Only QNA_ names are matched for near misses (the tools' own QNA_TEST_... are
    none): OPENAI_ and DATABASE_ ones are other programs' too (the SDK's
    OPENAI_ADMIN_KEY, a compose file's DATABASE_USER). Nothing is said of a name whose
    setting is set as well: a tool that reads the other name needs both."""
    known = sorted({name.upper() for name in _setting_fields() if name.upper() == name})
    names = {name.upper() for name in os.environ}
    # Settings() read and checked the file already; a file that failed that check
    # stopped the command before this is asked.
    with contextlib.suppress(ConfigurationError, OSError, UnicodeDecodeError):
        names |= _dotenv_names(env_file, "UTF-8")
    lines = []
    for name in sorted(names - set(known)):
        meant = _FORMER_NAMES.get(name)
        if meant is None and name.startswith("QNA_"):
            meant = next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.85)), None)
        if meant is not None and meant not in names:
            lines.append(f"{name} is not a setting qna reads; did you mean {meant}?")
    return lines


def setting_field(name: str, *, caller: str) -> str:
    """The field of the setting `name` names, in any case (as Settings takes them); a
    TypeError (as `caller`'s, with the name it may have meant) when it names none."""
    fields = _setting_fields()
    field = fields.get(name) or {key.lower(): f for key, f in fields.items()}.get(name.lower())
    if field is None:
        close = difflib.get_close_matches(name, sorted(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{caller} got an unexpected keyword argument {name!r}{hint}")
    return field


def load_settings(base: Settings | None = None, **overrides: object) -> Settings:
    """Settings from the environment (or `base`) with `overrides`, all validated;
    a wrong value is a ConfigurationError that names its variable."""
    if base is None:
        return Settings(**overrides)
    # Every value is given, so no .env file is read again: `base` may have been built
    # without one (`_env_file=None`), and a broken one in the working directory then
    # stopped connect(). (The environment is read, but every value given wins over it.)
    return Settings(_env_file=None, **{**base.model_dump(), **overrides})


def _split_tokens(tokens: SecretStr) -> list[str]:
    return [t.strip() for t in tokens.get_secret_value().split(",") if t.strip()]
