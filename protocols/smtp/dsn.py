"""RFC 3461 DSN parameters of MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT).

aiosmtpd upper-cases every parameter and refuses those it does not know, so
these are taken out of the command's argument first, with their case kept
(ENVID and ORCPT are the client's own strings), checked here, and the rest
of the argument goes on to aiosmtpd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: RFC 3461 §4.4: ENVID at most 100 characters; §4.2: ORCPT at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500
NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


class DsnParamError(ValueError):
    """A malformed DSN parameter: the reply to send."""


@dataclass(slots=True)
class MailParams:
    ret: str = ""
    envid: str = ""


@dataclass(slots=True)
class RcptParams:
    notify: str = ""
    orcpt: str = ""


def decode_xtext(text: str) -> str:
    """xtext (RFC 3461 §4): printable ASCII but "+" and "=", with "+XX" for
    any other octet. Raises :class:`DsnParamError` on anything else."""
    if not text.isascii() or any(not 33 <= ord(ch) <= 126 or ch == "=" for ch in text):
        raise DsnParamError("501 5.5.4 Malformed xtext")
    if "+" not in text:
        return text
    if _XTEXT_HEX.sub("", text).count("+"):
        raise DsnParamError("501 5.5.4 Malformed xtext")
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def encode_xtext(text: str) -> str:
    return "".join(ch if 33 <= ord(ch) <= 126 and ch not in "+=" else f"+{ord(ch):02X}" for ch in text)


def _split(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``arg`` without the parameters named ``names`` (any case), and those
    parameters' values, as given. The path ends at the first ``>`` outside
    a quoted string; parameters follow it."""
    end, quoted, escaped = -1, False, False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            end = i
            break
    if end < 0:
        return arg, {}
    head, kept, taken = arg[: end + 1], [], {}
    for token in arg[end + 1 :].split():
        key, eq, value = token.partition("=")
        if key.upper() in names:
            if key.upper() in taken or not eq:
                raise DsnParamError(f"501 5.5.4 Bad or repeated {key.upper()} parameter")
            taken[key.upper()] = value
        else:
            kept.append(token)
    return " ".join([head, *kept]), taken


def take_mail_params(arg: str) -> tuple[str, MailParams]:
    rest, found = _split(arg, ("RET", "ENVID"))
    params = MailParams()
    if "RET" in found:
        ret = found["RET"].upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnParamError("501 5.5.4 RET must be FULL or HDRS")
        params.ret = ret
    if "ENVID" in found:
        envid = decode_xtext(found["ENVID"])
        if not envid or len(found["ENVID"]) > MAX_ENVID or not envid.isprintable():
            raise DsnParamError("501 5.5.4 Bad ENVID")
        params.envid = envid
    return rest, params


def take_rcpt_params(arg: str) -> tuple[str, RcptParams]:
    rest, found = _split(arg, ("NOTIFY", "ORCPT"))
    params = RcptParams()
    if "NOTIFY" in found:
        events = found["NOTIFY"].upper().split(",")
        if events == ["NEVER"]:
            params.notify = "NEVER"
        elif not events or len(set(events)) != len(events) or any(e not in NOTIFY_EVENTS for e in events):
            raise DsnParamError("501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        else:
            params.notify = ",".join(e for e in NOTIFY_EVENTS if e in events)
    if "ORCPT" in found:
        raw = found["ORCPT"]
        addr_type, semi, value = raw.partition(";")
        if not semi or not _ADDR_TYPE.match(addr_type) or len(raw) > MAX_ORCPT:
            raise DsnParamError("501 5.5.4 ORCPT must be addr-type;xtext")
        decoded = decode_xtext(value)
        if not decoded or not decoded.isprintable():
            raise DsnParamError("501 5.5.4 Bad ORCPT")
        params.orcpt = f"{addr_type.lower()};{decoded}"
    return rest, params
