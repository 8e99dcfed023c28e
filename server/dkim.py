"""DKIM signing (RFC 6376) with one key per domain, kept in the store.

``rookery dkim generate DOMAIN`` calls :func:`generate`: it makes an RSA key,
stores it (``storage.queue``, key ``("q", "dkim", domain)``) so that every
node signs with it, and returns the DNS TXT record to publish. Submission
signs each message whose From: domain has a key, before it is queued or
delivered locally. dkimpy's RSA is pure Python and takes milliseconds, so
signing runs in an executor, never on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from storage.directory import normalize_domain
from storage.errors import AlreadyExists, NotFound, UnknownDomain
from storage.queue import Queue

log = logging.getLogger("rookery.dkim")

DEFAULT_SELECTOR = "rookery"
#: RFC 8301 §3.2: signers MUST use at least 1024 bits and SHOULD use 2048.
KEY_BITS = 2048
#: Relaxed header and body canonicalization survives benign rewrapping (RFC 6376 §3.4).
CANONICALIZE = (b"relaxed", b"relaxed")
#: Headers signed (RFC 6376 §5.4.1); From is required.
SIGNED_HEADERS = (
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to",
    b"references", b"mime-version", b"content-type", b"content-transfer-encoding",
)


def _new_key(bits: int) -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, base64.b64encode(public_der).decode()


def public_key_b64(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def txt_value(public_b64: str) -> str:
    """The TXT record's value (RFC 6376 §3.6.1)."""
    return f"v=DKIM1; k=rsa; p={public_b64}"


def dns_record(domain: str, selector: str, public_b64: str) -> str:
    """A zone-file line; the value is split into strings of ≤ 255 octets
    (RFC 1035 §3.3.14), which resolvers join."""
    value = txt_value(public_b64)
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {chunks} )"


async def generate(queue: Queue, domain: str, selector: str = DEFAULT_SELECTOR, *,
                   bits: int = KEY_BITS, replace: bool = False) -> str:
    """Create and store ``domain``'s signing key; return the DNS record to publish.

    Raises :class:`UnknownDomain` if the domain is not hosted, and
    :class:`AlreadyExists` if it has a key and ``replace`` is false.
    """
    domain = normalize_domain(domain)
    if not await queue.is_local_domain(domain):
        raise UnknownDomain(f"domain {domain} is not hosted here")
    if not replace and await queue.dkim_key(domain) is not None:
        raise AlreadyExists(f"domain {domain} already has a DKIM key (use --replace to make a new one)")
    private_pem, public_b64 = await asyncio.get_running_loop().run_in_executor(None, _new_key, bits)
    await queue.set_dkim_key(domain, selector, private_pem)
    return dns_record(domain, selector, public_b64)


async def show(queue: Queue, domain: str) -> str:
    """The DNS record of ``domain``'s existing key (``rookery dkim show``)."""
    domain = normalize_domain(domain)
    found = await queue.dkim_key(domain)
    if found is None:
        raise NotFound(f"domain {domain} has no DKIM key")
    selector, private_pem = found
    return dns_record(domain, selector, public_key_b64(private_pem))


def from_domain(raw: bytes) -> str | None:
    end = raw.find(b"\r\n\r\n")
    header = raw if end < 0 else raw[: end + 2]
    parsed = BytesHeaderParser(policy=compat32).parsebytes(header)
    addresses = [a for _, a in getaddresses([str(v) for v in parsed.get_all("From", [])]) if a]
    if not addresses:
        return None
    return addresses[0].rpartition("@")[2].lower() or None


class DkimSigner:
    """Signs with the key of the From: domain, when the store has one."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def sign(self, raw: bytes) -> bytes:
        domain = from_domain(raw)
        if domain is None:
            return raw
        found = await self.queue.dkim_key(domain)
        if found is None:
            return raw
        selector, private_pem = found
        signature = await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                dkim.sign,
                raw,
                selector.encode(),
                domain.encode(),
                private_pem.encode(),
                canonicalize=CANONICALIZE,
                include_headers=[h for h in SIGNED_HEADERS if _has_header(raw, h)] or [b"from"],
            ),
        )
        return bytes(signature) + raw


def _has_header(raw: bytes, name: bytes) -> bool:
    end = raw.find(b"\r\n\r\n")
    header = b"\r\n" + (raw if end < 0 else raw[:end]).lower()
    return b"\n" + name + b":" in header
