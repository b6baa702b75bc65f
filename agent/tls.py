"""Mutual TLS between paired sites, and the one-time pairing that makes two sites trust
each other.

Theory of operation
-------------------
Every agent has an *identity*: an EC P-256 key and a self-signed certificate, made on its
first start under ``DATA/tls/`` (the key readable by root only). There is no CA. A site
trusts exactly the certificates of the sites it was paired with, each one its own trust
anchor, and nothing else: no public CA, no host names (``check_hostname`` is off; the
certificate is the site's name).

Pairing (``ferry pair-token`` on site B, ``ferry pair HOST:PORT --token T`` on site A):

1. B makes a token ``<id>.<secret>``: the id names it, the 160-bit secret is known only to
   B and to whoever B's administrator hands it to. It expires (10 minutes by default) and
   is good for one pairing.
2. A opens TLS to B *without* a client certificate and without checking B's (it does not
   know it yet), and sends a PAIR frame: the token id, A's certificate, and
   ``HMAC(key, "source" | fp(A) | fp(B))``, where ``fp`` is the SHA-256 of a certificate as
   A saw it in the handshake, and ``key`` is derived from the secret.
3. B recomputes the MAC over A's certificate and its own: it only matches if nobody stood
   in between (a man in the middle shows A another certificate than B's) and the sender
   knows the secret. B burns the token, keeps A's certificate, and answers PAIRED with
   ``HMAC(key, "target" | fp(A) | fp(B))``; A checks it the same way and keeps B's.

From then on each site presents its certificate and requires the other's: the TLS server
asks for a client certificate (``CERT_OPTIONAL``: a connection with none may only pair),
and both sides verify against the paired certificates alone. An unknown certificate fails
the handshake; the replication port also refuses plain TCP unless the agent runs with
``--insecure`` (labs), which it detects from the first byte (a TLS record starts 0x16),
peeked at, not read.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import stat
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple

import trio

from formats.durable import write_atomic

from .errors import Forbidden, StorageError

TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS connection
TOKEN_TTL = 600.0
TOKEN_ATTEMPTS = 3           # wrong MACs before a token is burnt anyway
SNI = "ferry"                # sent, never checked: sites are named by their certificate


class PairingError(Forbidden):
    """Pairing was refused or failed; the message says why, for the administrator."""


@dataclass(frozen=True)
class Identity:
    cert_path: str
    key_path: str
    cert_pem: str

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def load_identity(data_dir: str, site: str) -> Identity:
    """This site's key and certificate, made on first use. Either one reached through a
    symlink, or with another hard link, is refused (StorageError): the site's identity is
    never read from, nor written through, a planted link."""
    tls_dir = os.path.join(data_dir, "tls")
    cert_path = os.path.join(tls_dir, "site.crt")
    key_path = os.path.join(tls_dir, "site.key")
    for p in (cert_path, key_path):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise StorageError("the site's TLS identity file %s is not a plain file of its "
                               "own (a link?): refused" % p, p)
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        os.makedirs(tls_dir, mode=0o700, exist_ok=True)
        cert_pem, key_pem = _make_certificate(site)
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert_pem)
    with open(cert_path) as f:
        cert_pem_text = f.read()
    return Identity(cert_path, key_path, cert_pem_text)


def _make_certificate(site: str) -> Tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry"),
                      x509.NameAttribute(NameOID.COMMON_NAME, ("ferry site " + site)[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=100 * 365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: str, data: bytes) -> None:
    """Replace ``path`` (mode 0600) with ``data``, durably with its name."""
    write_atomic(path, data, 0o600)


# --- contexts -------------------------------------------------------------------------------


def server_context(identity: Identity, trusted: Iterable[str]) -> ssl.SSLContext:
    """Present our certificate; ask for the client's and accept only a paired one (none at
    all is let through, for pairing only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    pems = "".join(trusted)
    if pems:
        ctx.load_verify_locations(cadata=pems)
    return ctx


def client_context(identity: Identity, trusted: Iterable[str]) -> ssl.SSLContext:
    """Present our certificate; accept only a paired site's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    pems = "".join(trusted)
    if pems:
        ctx.load_verify_locations(cadata=pems)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def pairing_context() -> ssl.SSLContext:
    """For the pairing connection only: no certificate either way is checked by TLS; the
    PAIR/PAIRED MACs bind both certificates to the token instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def is_verify_failure(exc: BaseException) -> bool:
    """Did a TLS handshake fail because a certificate is not a paired one?"""
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def tls_reason(exc: BaseException) -> str:
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return str(getattr(cause, "reason", None) or cause)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def peer_der(stream: TLSSocketStream) -> Optional[bytes]:
    """The certificate the peer presented and TLS verified (None if it sent none)."""
    der = stream.getpeercert(binary_form=True)
    return der or None


# --- tokens and MACs ------------------------------------------------------------------------


def new_token() -> Tuple[str, str]:
    """(token id, the whole token to hand to the other site's administrator)."""
    token_id = secrets.token_hex(4)
    secret = base64.b32encode(secrets.token_bytes(20)).decode().lower().rstrip("=")
    return token_id, "%s.%s" % (token_id, secret)


def parse_token(token: str) -> Tuple[str, bytes]:
    """(token id, MAC key); PairingError if it does not look like one of ours."""
    token_id, sep, secret = token.strip().partition(".")
    if not sep or len(token_id) != 8 or len(secret) != 32 \
            or any(c not in "0123456789abcdef" for c in token_id):
        raise PairingError("%r is not a pairing token (it looks like 1a2b3c4d.<32 letters>; "
                           "make one with `ferry pair-token` on the target site)" % token)
    return token_id, key_from_secret(secret)


def key_from_secret(secret: str) -> bytes:
    return hashlib.sha256(b"ferry-pair-v1\0" + secret.lower().encode()).digest()


def pair_mac(key: bytes, role: str, source_der: bytes, target_der: bytes) -> bytes:
    message = b"ferry-pair-v1\0" + role.encode() + b"\0" + hashlib.sha256(
        source_der).digest() + hashlib.sha256(target_der).digest()
    return hmac.new(key, message, hashlib.sha256).digest()


def check_mac(key: bytes, role: str, source_der: bytes, target_der: bytes,
              mac: bytes) -> bool:
    return hmac.compare_digest(pair_mac(key, role, source_der, target_der), mac)


# --- a TLS stream on the socket itself ------------------------------------------------------


class TLSSocketStream(trio.abc.Stream):
    """TLS on a non-blocking ``ssl.SSLSocket``, driven by trio's readiness waits.

    ``trio.SSLStream`` runs OpenSSL over memory BIOs and goes through trio's scheduler for
    every TLS record (16 KiB): over loopback it moves about a quarter of what plain TCP
    does. Here OpenSSL reads and writes the socket itself and one ``receive_some`` drains
    every record already there, so a 1 MiB frame costs a few dozen C calls. The socket is
    taken over from a connected ``trio.SocketStream`` (detached: the stream must not be
    used any more). Errors surface as trio's: ``BrokenResourceError`` from the
    ``ssl.SSLError`` (see ``is_verify_failure``), ``b""`` at a clean end.
    """

    def __init__(self, stream: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool
                 ) -> None:
        raw = socket.socket(fileno=stream.socket.detach())
        self._sock = ctx.wrap_socket(raw, server_side=server_side,
                                     server_hostname=None if server_side else SNI,
                                     do_handshake_on_connect=False)
        self._sock.setblocking(False)
        self._closed = False

    @property
    def socket(self) -> ssl.SSLSocket:
        return self._sock

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._sock.getpeercert(binary_form)

    async def _wait(self, e: BaseException) -> None:
        if isinstance(e, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(self._sock)
        else:
            await trio.lowlevel.wait_readable(self._sock)

    async def do_handshake(self) -> None:
        while True:
            try:
                self._sock.do_handshake()
                return
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                await self._wait(e)
            except (ssl.SSLError, OSError) as e:
                raise trio.BrokenResourceError("TLS handshake failed: %s" % e) from e

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes | bytearray:
        """Everything already readable, up to ``max_bytes``; waits only if none is."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        size = max_bytes or 256 * 1024
        buf = bytearray(size)
        with memoryview(buf) as view:
            got = 0
            while got < size:
                try:
                    n = self._sock.recv_into(view[got:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                    if got:
                        break
                    await self._wait(e)
                    continue
                except ssl.SSLZeroReturnError:
                    break  # the peer ended the TLS session
                except (ssl.SSLError, OSError) as e:
                    if got:
                        break  # hand over what arrived; the error comes back next call
                    raise trio.BrokenResourceError("TLS: %s" % e) from e
                if n == 0:
                    break
                got += n
        del buf[got:]
        await trio.lowlevel.cancel_shielded_checkpoint()
        return buf

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += self._sock.send(view[sent:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                    await self._wait(e)
                except (ssl.SSLError, OSError) as e:
                    raise trio.BrokenResourceError("TLS: %s" % e) from e
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
