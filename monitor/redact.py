"""Secrets out of everything the monitor shows: one function, `redact`, for every output surface.

`config show`, config errors, log lines and alert channels' failure logs all pass text through
`redact` (or `redact_url` for a value known to be one URL, `short` for a value shown in an error).
What is masked, with `***`:

- a URL's password (`redis://user:PW@host`), and the whole user part when it has no `:`
  (`redis://TOKEN@host`: a password written where the user name goes); any scheme, mistyped ones
  (`redis//:PW@host`, `redis:PW@host`) too, and strings `urllib` cannot parse;
- query-string and fragment values whose name says secret (`password`, `token`, `access_token`,
  `secret`, `key`, `sign`, `auth`, ...), in URLs and in free text (`token=...`);
- the path and query of an alert URL (webhooks, Slack, DingTalk carry their secret there):
  `redact_url(url, path=True)`; in free text, the path of a URL on a known webhook host;
- any literal secret the caller names (`secrets=`): an alert channel's configured values;
- all of a notification-service URL but its scheme (`redact_service_url`: Apprise's URLs carry a
  token anywhere, `tgram://BOT_TOKEN/CHAT_ID`).

The functions never raise and run in time linear in their input.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Hosts whose URLs carry their secret in the path (incoming webhooks): masked after the host.
WEBHOOK_HOSTS = (
    "hooks.slack.com",
    "oapi.dingtalk.com",
    "discord.com",
    "discordapp.com",
    "webhook.office.com",
    "outlook.office.com",
    "open.feishu.cn",
    "open.larksuite.com",
    "qyapi.weixin.qq.com",
    "api.telegram.org",
    "chat.googleapis.com",
    "hooks.zapier.com",
)

# A query parameter (or `name=value` in text) is secret when its name, split at `_`, `-`, `.`,
# ends with one of these words, or contains one of _SECRET_PARTS anywhere.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "token",
        "secret",
        "key",
        "apikey",
        "sig",
        "sign",
        "signature",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "cookie",
    }
)
_SECRET_PARTS = ("password", "passwd", "secret", "token", "apikey", "credential")

# Everything here runs in time linear in its input: text is split into tokens by C-speed
# splits, and every regular expression either starts at a fixed character or is bounded.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}:")
_TOKENS = re.compile(r"([\s'\"<>`]+)")
_PARAMS = re.compile(r"([&;,?#])")
_NAME_AT_END = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_SCHEME_AT_END = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}:?\Z")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{6,}")


def is_secret_name(name: str) -> bool:
    """True for a parameter or header name that says it holds a secret: one that contains
    `password`, `secret`, `token`, ... anywhere, or ends with a word such as `key`, `sign` or
    `auth` (`X-Api-Key`, `access_key`; not `key_pattern`, not `ssl_keyfile`)."""
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    words = [w for w in re.split(r"[_\-.\s]+", lowered) if w]
    return bool(words) and words[-1] in _SECRET_WORDS


def redact_url(url: str, *, path: bool = False) -> str:
    """`url` with its password (or token user part) and secret query values masked; with
    `path=True` (an alert URL) everything after the host is masked too. Any string is taken,
    parseable or not."""
    text = str(url)
    head, rest = _split_head(text)
    # The user part runs to the last `@` before the query: a password may hold `/` or `@`.
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query_at)
    if at >= 0:
        user = rest[:at]
        shown_user = f"{user.split(':', 1)[0]}:{MASK}" if ":" in user else MASK
        head, rest = f"{head}{shown_user}@", rest[at + 1 :]
    if path:
        end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        return head + rest[:end] + ("/" + MASK if end < len(rest) else "")
    return head + _mask_params(rest)


def redact(text: str, *, secrets: Iterable[str] = ()) -> str:
    """Free text (an error, a log value) with every secret in it masked: URLs' passwords and
    secret parameters, webhook URLs' paths, `name=value` pairs whose name says secret (a quoted
    value whole), `Bearer ...` credentials, and each of `secrets` wherever it appears."""
    out = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        out = out.replace(secret, MASK)
    parts = _TOKENS.split(out)  # words at even indices, the spaces and quotes between them at odd
    masking: str | None = None  # inside a secret value: the quote that ends it ("" for one word)
    for i in range(0, len(parts), 2):
        after = parts[i + 1] if i + 1 < len(parts) else ""
        if masking is not None:
            if parts[i]:
                parts[i] = MASK
            if masking == "" or masking in after:
                masking = None
            continue
        word = parts[i]
        if "//" in word or ("@" in word and ":" in word):
            word = _redact_url_in_word(word)
        if "=" in word:
            word = _mask_params_in_word(word)
        spaced = i >= 2 and parts[i - 1].isspace() and _names_secret(parts[i - 2])  # `secret = xyz`
        if spaced and word.startswith("=") and word != "=":
            word = "=" + MASK
        elif after and ((spaced and word == "=") or (word.endswith("=") and _names_secret(word[:-1]))):
            # `password= word`, `password = word` or `password='a b'`: the value is the next word(s).
            quote = after.lstrip()[:1]
            if quote not in ("'", '"'):
                masking = ""
            elif after.count(quote) == 1:
                masking = quote
        parts[i] = word
    return _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", "".join(parts))


def redact_service_url(url: str) -> str:
    """A notification-service URL whose every part may be a secret (Apprise's `tgram://BOT_TOKEN/CHAT`,
    `discord://WEBHOOK_ID/TOKEN`, `mailto://user:password@host`): its scheme, the rest masked."""
    scheme = _SCHEME.match(str(url))
    return f"{scheme.group(0)}//{MASK}" if scheme else MASK


def secret_fragments(value: str, *, host_is_secret: bool = False) -> list[str]:
    """The pieces of a configured secret worth masking wherever they appear: the value itself
    and, for a URL, its path and query, and each long piece of it but the host name (an error
    may quote a URL cut, escaped, or only its port or path). `host_is_secret`: the host's place
    holds a token too (Apprise's URLs), and is masked with the rest."""
    value = str(value)
    pieces = [value]
    head, rest = _split_head(value)
    if head:
        slash = rest.find("/")
        if slash >= 0 and len(rest) - slash > 1:
            tail = rest[slash:]
            pieces += [tail, tail.split("?", 1)[0]]
        host = _host_of(rest)
        pieces += [
            p
            for p in re.split(r"[/?&=#:@;,\s\x00-\x1f\x7f]+", rest)
            if len(p) >= 8 and (host_is_secret or p.lower() != host)
        ]
    return list(dict.fromkeys(p for p in pieces if len(p) >= 6))


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, with strings redacted before they are cut (a cut never shows
    half a password) and integers too long to print named, not printed."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 4
        self.maxstring = limit
        self.maxother = limit

    def repr_str(self, x: str, level: int) -> str:
        return _cut(repr(redact(x)), self.maxstring)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return "<a very large integer>"
        return repr(x)

    def repr1(self, x: Any, level: int) -> str:
        # By type, not by type name: a str or int subclass is redacted and bounded too.
        if isinstance(x, str):
            return self.repr_str(str(x), level)
        if isinstance(x, int) and not isinstance(x, bool):
            return self.repr_int(int(x), level)
        return super().repr1(x, level)


def short(value: Any, limit: int = 60) -> str:
    """A bounded, redacted repr of any value, for an error message: at most about `limit`
    characters, whatever the value's size or depth."""
    try:
        return _cut(_ShortRepr(limit).repr(value), limit + 20)
    except Exception:  # noqa: BLE001 - a value's own __repr__ failing must not become the error
        return f"<{type(value).__name__}>"


def label(value: Any, limit: int = 80) -> str:
    """A name (a key, a variable, a file) shown as it is when it is short printable text,
    else as `short` shows it: an error line stays one bounded line."""
    if isinstance(value, str) and value.isprintable() and 0 < len(value) <= limit:
        return redact(str(value))
    return short(value, min(limit, 40))


# --- internals -------------------------------------------------------------------------------


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def _split_head(text: str) -> tuple[str, str]:
    """(scheme and `//`, the rest): `redis://` + `h/0`; mistyped `redis//` and `redis:` too."""
    slashes = text.find("//")
    scheme = _SCHEME.match(text)
    if scheme and text.startswith("//", scheme.end()):
        cut = scheme.end() + 2
    elif slashes >= 0 and re.fullmatch(r"[A-Za-z0-9+.\-:]*", text[:slashes]):
        cut = slashes + 2  # `redis//host`, `//host`
    elif scheme:
        cut = scheme.end()  # `redis:pw@host`, `unix:/path`
    else:
        cut = 0
    return text[:cut], text[cut:]


def _redact_url_in_word(word: str) -> str:
    """A word of free text holding a URL (or something like one): what precedes the URL kept."""
    slashes = word.find("//")
    start = 0
    if slashes >= 0:
        scheme = _SCHEME_AT_END.search(word[max(0, slashes - 33) : slashes])
        start = slashes - (len(scheme.group(0)) if scheme else 0)
    prefix, url = word[:start], word[start:]
    host = _host_of(_split_head(url)[1])
    known = any(host == h or host.endswith("." + h) for h in WEBHOOK_HOSTS)
    return prefix + redact_url(url, path=known)


def _host_of(rest: str) -> str:
    """The host name in what follows a URL's scheme, lower case."""
    host = rest.rsplit("@", 1)[-1] if "@" in rest.split("?", 1)[0] else rest
    return re.split(r"[/?#:]", host, maxsplit=1)[0].lower()


def _names_secret(text: str) -> bool:
    """Whether `text` ends with a secret name (`...&password`)."""
    name = _NAME_AT_END.search(text[-64:])
    return name is not None and is_secret_name(_unquote(name.group(0)))


def _mask_params_in_word(word: str) -> str:
    """`name=value` pieces of a word (split at & ; , ? #) with secret-named values masked."""
    pieces = _PARAMS.split(word)
    for j in range(0, len(pieces), 2):
        piece = pieces[j]
        eq = piece.find("=")
        value = piece[eq + 1 :]
        if eq <= 0 or not value or value == MASK:
            continue
        if _names_secret(piece[:eq]):
            pieces[j] = piece[: eq + 1] + MASK
    return "".join(pieces)


def _mask_params(rest: str) -> str:
    """The query and fragment of `rest` (host and path first) with secret values masked."""
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return rest
    return rest[:cut] + re.sub(r"([?#&;])([^=&;#?]*)=([^&;#?]*)", _mask_pair, rest[cut:])


def _mask_pair(match: re.Match[str]) -> str:
    sep, name, value = match.group(1), match.group(2), match.group(3)
    return f"{sep}{name}={MASK}" if value and is_secret_name(_unquote(name)) else match.group(0)


def _unquote(name: str) -> str:
    return unquote(name) if "%" in name else name
