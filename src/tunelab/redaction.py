"""Secrets never leave tunelab in clear.

What leaves (config.yaml, manifests, MLflow params and tags, logs, Kubernetes ConfigMaps) holds no secret:
values of keys named like secrets, credentials inside URIs, and the values of the environment variables that
`*_env` keys name are replaced by ***. (The variable's name is fine, and is what is kept.)
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.config import RunConfig

REDACTED = "***"
SECRET_KEY = re.compile(r"(?i)(token|secret|passw(or)?d|passwd|pwd|credentials?|auth|key)$|^(secret|password)")
# scheme:// -- or scheme:/ as pathlib prints a URL given where a file was expected (it folds the "//").
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*:/+[^\s'\"<>]+")
# A query parameter holding a secret, by its whole name or its last word: token, access_token, X-Amz-Signature,
# sig (Azure SAS), apikey. Not a word that merely contains one (keyword, design): rewriting those would change
# a URL the run needs.
_SECRET_PARAM = re.compile(r"(?i)(^|[_\-.]|api|access|refresh|client|private|secret)"
                           r"(token|secret|passw(or)?d|pwd|key|sig|signature|auth|authorization|credentials?|"
                           r"session(id)?)$")
# user:password@ where the password may hold "/" (SQLAlchemy and urllib read up to the last "@" before the host).
_USERINFO = re.compile(r"^(?P<user>[^/:@?#]*):(?P<password>[^?#]*)@(?P<rest>[^@]*)$")


def is_secret_key(name: str) -> bool:
    """A key or variable named like a secret (HF_TOKEN, api_key, password, AWS_SECRET_ACCESS_KEY); `*_env`
    keys hold a variable's name, not its value, and are not secrets."""
    return not name.lower().endswith("_env") and SECRET_KEY.search(name) is not None


def uri_credentials(text: str) -> bool:
    """Whether `text` holds a URI with credentials (user:password@, token@, or a ?token=-like parameter)."""
    return redact_uris(text) != text


_NOT_SECRETS = {"PWD", "OLDPWD"}  # the shell's working folders: named like a password ("pwd"), and every path


def redact_message(text: str) -> str:
    """An error message or log line as it may be shown or stored: URI credentials, and the values of the
    environment's secret-named variables (HF_TOKEN, JUDGE_API_KEY, ...; 8 characters or more) replaced by ***.
    An endpoint's error may echo the key it was sent (`Incorrect API key provided: sk-...`)."""
    secrets = [value for name, value in os.environ.items()
               if is_secret_key(name) and name not in _NOT_SECRETS and len(value) >= 8]
    return redact(text, sorted(secrets, key=len, reverse=True))


def redact_uris(text: str) -> str:
    """`text` with the credentials inside any URI replaced by ***: https://user:***@host/?token=***."""
    def one(match: re.Match[str]) -> str:
        uri = match.group(0)
        scheme, sep, rest = re.match(r"([^:]*)(:/+)(.*)", uri, re.S).groups()  # type: ignore[union-attr]
        login = _USERINFO.match(rest)
        if login and login.group("password"):
            rest = f"{login.group('user')}:{REDACTED}@{login.group('rest')}"
        authority, slash, tail = rest.partition("/") if "/" in rest.split("?")[0] else (rest.split("?")[0], "", "")
        if not slash:  # no path: the query (if any) follows the authority
            tail = rest[len(authority):]
        if "@" in authority and (sep == "://" or ":" in authority.rpartition("@")[0]):  # models:/NAME@ALIAS: no secret
            userinfo, _, host = authority.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            authority = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
        tail = re.sub(r"([?&;])([^=&;#]+)=([^&;#]*)",
                      lambda m: f"{m.group(1)}{m.group(2)}={REDACTED if _SECRET_PARAM.search(m.group(2)) else m.group(3)}",
                      tail)
        return f"{scheme}{sep}{authority}{slash}{tail}"

    return _URI.sub(one, text)


def env_secrets(data: Any) -> list[str]:
    """The values of the environment variables that `*_env` keys in `data` name (e.g. eval.judge.api_key_env)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower().endswith("_env") and isinstance(value, str) and len(os.environ.get(value, "")) >= 4:
                found.append(os.environ[value])
            found += env_secrets(value)
    elif isinstance(data, list):
        for item in data:
            found += env_secrets(item)
    return found


def redact(data: Any, secrets: list[str] | None = None, key: str = "") -> Any:
    """A copy of `data` (dicts, lists, strings) with secrets replaced by ***: values under secret-named keys,
    URI credentials, and any occurrence of the strings in `secrets` (by default, the values of the variables
    that `*_env` keys name)."""
    if secrets is None:
        secrets = env_secrets(data)
    if isinstance(data, dict):  # under a `*_env` key: variable names and Secret references, kept as they are
        return {k: v if str(k).lower().endswith("_env") else redact(v, secrets, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(item, secrets, key) for item in data]
    if isinstance(data, str):
        if is_secret_key(key) and data:
            return REDACTED
        for secret in secrets:
            data = data.replace(secret, REDACTED)
        return redact_uris(data)
    return data


def redacted_config(cfg: RunConfig) -> dict[str, Any]:
    """cfg as a JSON-ready mapping, secrets redacted."""
    return redact(cfg.model_dump(mode="json"))
