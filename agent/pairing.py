"""How this agent reaches and admits other sites: TLS with paired certificates, or plain
TCP with ``--insecure``. The mechanics (certificates, MACs, contexts) are in ``tls.py``."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any, Dict, List, Optional, Tuple

import trio

from . import tls
from .protocol import frames, messages
from .protocol.session import SourceSession, TargetSession
from .protocol.stream import SessionStream, keepalive
from .store import PeerRow, Store

log = logging.getLogger("ferry.tls")

HANDSHAKE_TIMEOUT = 10.0


class NotPaired(OSError):
    """The other site is not paired with this one (or no longer): the message says how to
    pair."""


class Refused(Exception):
    """An incoming connection this site will not talk to; the message is the log line."""


def how_to_pair(address: str) -> str:
    return ("pair the sites first: on the target site run `ferry pair-token`, then here "
            "`ferry pair %s --token TOKEN`" % address)


def refused_us(address: str) -> NotPaired:
    """The error for a TLS session the target closed before a word: it did not accept our
    certificate."""
    return NotPaired("the site at %s closed the TLS session at once: it does not know this "
                     "site's certificate (not paired, or the pairing was removed there); %s"
                     % (address, how_to_pair(address)))


class Trust:
    def __init__(self, store: Store, identity: tls.Identity, site: str,
                 insecure: bool = False, listen: Tuple[str, int] = ("", 4005)) -> None:
        host = listen[0] if listen[0] not in ("", "0.0.0.0", "::") else socket.getfqdn()
        self.address = "%s:%d" % (host if ":" not in host else "[%s]" % host, listen[1])
        self.store = store
        self.identity = identity
        self.site = site
        self.insecure = insecure
        self._contexts: Optional[Tuple[ssl.SSLContext, ssl.SSLContext]] = None

    def peers(self) -> List[PeerRow]:
        return self.store.peers()

    def _ctx(self) -> Tuple[ssl.SSLContext, ssl.SSLContext]:
        if self._contexts is None:
            certs = [p.cert for p in self.store.peers()]
            self._contexts = (tls.server_context(self.identity, certs),
                              tls.client_context(self.identity, certs))
        return self._contexts

    def _peers_changed(self) -> None:
        self._contexts = None  # sessions already up keep going; new ones use the new set

    # -- outgoing --------------------------------------------------------------------------

    async def connect(self, host: str, port: int, address: str) -> trio.abc.Stream:
        """A stream to the site at ``address``: TLS to a paired site, or plain TCP when
        this agent runs ``--insecure``. NotPaired if TLS says the site is not ours."""
        stream = await trio.open_tcp_stream(host, port)
        try:
            keepalive(stream)
        except BaseException:
            await stream.aclose()
            raise
        if self.insecure:
            return stream
        ssl_stream = tls.TLSSocketStream(stream, self._ctx()[1], server_side=False)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await ssl_stream.do_handshake()
            return ssl_stream
        except trio.TooSlowError:
            await ssl_stream.aclose()
            raise OSError("no TLS handshake from %s within %g s" % (address, HANDSHAKE_TIMEOUT)
                          ) from None
        except trio.BrokenResourceError as e:
            await ssl_stream.aclose()
            if tls.is_verify_failure(e):
                raise NotPaired("the site at %s is not paired with this one (its certificate "
                                "is not one of a paired site); %s"
                                % (address, how_to_pair(address))) from None
            raise OSError("TLS with %s failed: %s" % (address, tls.tls_reason(e))) from None
        except BaseException:
            await ssl_stream.aclose()
            raise

    async def pair(self, host: str, port: int, address: str, token: str) -> Dict[str, Any]:
        """Pair with the site at ``address`` (its administrator gave us ``token``)."""
        token_id, key = tls.parse_token(token)
        stream = await trio.open_tcp_stream(host, port)
        ssl_stream = tls.TLSSocketStream(stream, tls.pairing_context(), server_side=False)
        fs = SessionStream(ssl_stream, address, SourceSession())
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await ssl_stream.do_handshake()
                their_der = tls.peer_der(ssl_stream) or b""  # none: the MAC check fails
                ours = self.identity.der
                await fs.send(messages.Pair(token_id, self.site, self.identity.cert_pem,
                                            tls.pair_mac(key, "source", ours, their_der)))
                paired = await fs.expect(messages.Paired)
        except trio.TooSlowError:
            raise tls.PairingError("the site at %s did not answer within %g s"
                                   % (address, HANDSHAKE_TIMEOUT)) from None
        except frames.RemoteError as e:
            raise tls.PairingError("the site at %s refused: %s" % (address, e)) from None
        except (trio.BrokenResourceError, EOFError, frames.ProtocolError) as e:
            raise tls.PairingError("pairing with %s failed: %s (is it a Ferry agent's "
                                   "replication port?)" % (address, tls.tls_reason(e))) from None
        finally:
            await fs.aclose()
        site = paired.site
        if not tls.check_mac(key, "target", ours, their_der, paired.mac):
            raise tls.PairingError("the site at %s answered without proof that it made this "
                                   "token: someone may stand between the sites; not paired"
                                   % address)
        peer = PeerRow(tls.fingerprint(their_der), site, address,
                       ssl.DER_cert_to_PEM_cert(their_der), time.time())
        replaced = self.store.add_peer(peer)
        self._peers_changed()
        log.info("paired with site %s at %s (%s)%s", site, address, peer.fingerprint,
                 "; it replaces an older certificate" if replaced else "")
        return {"site": site, "address": address, "fingerprint": peer.fingerprint,
                "own_fingerprint": self.identity.fingerprint}

    # -- incoming --------------------------------------------------------------------------

    def make_token(self, ttl: float) -> Dict[str, Any]:
        token_id, token = tls.new_token()
        expires = time.time() + ttl
        self.store.add_token(token_id, tls.parse_token(token)[1], expires)
        log.info("pairing token %s made; it expires in %d s", token_id, ttl)
        return {"token": token, "id": token_id, "expires": expires, "address": self.address,
                "fingerprint": self.identity.fingerprint}

    async def accept(self, stream: trio.SocketStream, peer: str
                     ) -> Tuple[trio.abc.Stream, Optional[bytes], bool]:
        """Look at a new connection: (stream to use, the paired certificate it presented or
        None, is it TLS). Refused for plaintext to a TLS-only site (after telling the
        peer why) and for a failed handshake. From TLS on, ``stream`` is not to be used
        (its socket belongs to the returned stream) but closing it is harmless."""
        first = await stream.socket.recv(1, socket.MSG_PEEK)
        if not first:
            raise Refused("%s closed the connection before a word" % peer)
        if first[0] != tls.TLS_RECORD_HANDSHAKE:
            if self.insecure:
                return stream, None, False
            fs = SessionStream(stream, peer, TargetSession())
            await fs.send_error(frames.E_TLS_REQUIRED, "this site accepts only TLS from paired "
                                "sites; " + how_to_pair("HOST:PORT"))
            raise Refused("refusing a plaintext connection from %s: this site accepts only "
                          "TLS from paired sites (or start it with --insecure, labs only)"
                          % peer)
        ssl_stream = tls.TLSSocketStream(stream, self._ctx()[0], server_side=True)
        try:
            await ssl_stream.do_handshake()
        except BaseException as e:
            await ssl_stream.aclose()
            if not isinstance(e, trio.BrokenResourceError):
                raise
            if tls.is_verify_failure(e):
                raise Refused("refusing TLS from %s: its certificate is not one of a paired "
                              "site (%s)" % (peer, tls.tls_reason(e))) from None
            raise Refused("TLS handshake with %s failed: %s (a site that is not paired with "
                          "this one hangs up like this)" % (peer, tls.tls_reason(e))) from None
        return ssl_stream, tls.peer_der(ssl_stream), True

    async def answer_pair(self, fs: SessionStream, msg: messages.Pair, is_tls: bool,
                          peer: str) -> None:
        """The target's side of a PAIR message."""
        if not is_tls or not isinstance(fs.stream, tls.TLSSocketStream):
            raise Refused("refusing to pair with %s over plaintext" % peer)
        token_id, site, cert, mac = msg.token, msg.site, msg.cert, msg.mac
        try:
            their_der = ssl.PEM_cert_to_DER_cert(cert)
        except ValueError:
            raise frames.ProtocolError("PAIR carries no certificate") from None
        row = self.store.token(token_id)
        reason = None
        if row is None:
            reason = "unknown token %s (tokens are made with `ferry pair-token` here)" % token_id
        elif row.used is not None:
            reason = "token %s was already used" % token_id
        elif row.expires < time.time():
            reason = "token %s expired %d s ago" % (token_id, time.time() - row.expires)
        elif row.key is None or not tls.check_mac(row.key, "source", their_der,
                                                  self.identity.der, mac):
            burnt = self.store.token_failed(token_id, tls.TOKEN_ATTEMPTS)
            reason = "wrong secret for token %s%s" % (
                token_id, " (it is now burnt)" if burnt else "")
        elif not self.store.use_token(token_id):
            reason = "token %s was already used" % token_id
        if reason is not None:
            await fs.send_error(frames.E_PAIRING, reason)
            raise Refused("refusing to pair with %s (site %r): %s" % (peer, site, reason))
        assert row is not None and row.key is not None
        await fs.send(messages.Paired(self.site, tls.pair_mac(row.key, "target", their_der,
                                                               self.identity.der)))
        replaced = self.store.add_peer(PeerRow(tls.fingerprint(their_der), site, peer, cert,
                                               time.time()))
        self._peers_changed()
        log.info("paired with site %s from %s (%s)%s", site, peer, tls.fingerprint(their_der),
                 "; it replaces an older certificate" if replaced else "")

    def unpair(self, site: str) -> int:
        n = self.store.remove_peer(site)
        if n:
            self._peers_changed()
            log.info("unpaired site %s", site)
        return n

    def status(self) -> Dict[str, Any]:
        return {"insecure": self.insecure, "fingerprint": self.identity.fingerprint,
                "peers": [{"site": p.site, "address": p.address, "fingerprint": p.fingerprint,
                           "paired": p.paired} for p in self.store.peers()]}
