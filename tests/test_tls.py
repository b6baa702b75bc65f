"""TLS between paired sites: pairing with a one-time token, replication over mutual TLS,
and every refusal (unpaired peer, plaintext to a TLS side, reused, expired or wrong token)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time

import nbd
import pytest
from conftest import Lab, same_bytes
from test_faults import SIZE, Writer, _read_frame, check_identical, wait_for

from agent import tls
from agent.errors import EXIT_DENIED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE
from agent.pairing import NotPaired
from agent.protocol import frames
from lab.proxy import FaultProxy
from lab.sites import free_port

MiB = 1024 * 1024


def write_and_check(lab: Lab, uri: str, disk) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(os.urandom(MiB), 3 * MiB)
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "vm1", "--synced", "--timeout", "60")
    assert same_bytes(disk, lab.restore("vm1", "vda"))


def in_log(site, text: str) -> None:
    """The agent logs a refusal just after it told the peer: wait for the line."""
    wait_for(lambda: text in site.log.read_text(), timeout=10, what=repr(text))


def protect_vm1(lab: Lab, size: int = 16 * MiB, target: str = "", check: bool = True):
    disk = lab.image("vda.img", size)
    proc = lab.a.ferry("protect", "vm1", "--disk", "vda=%s" % disk, "--target",
                       target or lab.b.address, check=check)
    return disk, proc


def test_pair_then_replicate_over_mutual_tls(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    # Unpaired: protect refuses and says how to pair; nothing is left behind.
    disk, proc = protect_vm1(lab, check=False)
    assert proc.returncode == EXIT_DENIED
    assert "not paired" in proc.stderr and "ferry pair-token" in proc.stderr \
        and "ferry pair %s --token" % lab.b.address in proc.stderr, proc.stderr
    assert lab.a.status()["groups"] == {}
    # Pair as the issue gives it: a token printed on B, used on A.
    token_out = lab.b.ferry("pair-token")
    token = token_out.stdout.strip()
    assert len(token_out.stdout.splitlines()) == 1 and "." in token
    out = lab.a.ferry("pair", lab.b.address, "--token", token).stdout
    assert "paired with site B" in out
    peers_a = lab.a.api("GET", "/v1/pairs")
    peers_b = lab.b.api("GET", "/v1/pairs")
    assert [p["site"] for p in peers_a["peers"]] == ["B"]
    assert [p["site"] for p in peers_b["peers"]] == ["A"]
    # Each side keeps exactly the other's certificate.
    assert peers_a["peers"][0]["fingerprint"] == peers_b["fingerprint"]
    assert peers_b["peers"][0]["fingerprint"] == peers_a["fingerprint"]
    # The token was for one pairing.
    again = lab.a.ferry("pair", lab.b.address, "--token", token, check=False)
    assert again.returncode == EXIT_DENIED and "already used" in again.stderr, again.stderr
    in_log(lab.b, "already used")
    # Replication now runs over TLS.
    uri = lab.a.ferry("protect", "vm1", "--disk", "vda=%s" % disk, "--target",
                      lab.b.address).stdout.split("\t")[1].strip()
    write_and_check(lab, uri, disk)
    status = lab.a.status()
    assert status["security"]["mode"] == "tls"
    assert status["security"]["paired_sites"] == ["B"]
    in_log(lab.b, "TLS, 0 paired site(s)")
    # The pairing outlives a restart of both agents.
    lab.a.stop()
    lab.b.stop()
    lab.b.start()
    lab.a.start()
    write_and_check(lab, uri, disk)


def test_identity_key_is_private(tls_lab: Lab) -> None:
    tls_lab.a.start()
    key = tls_lab.a.data / "tls" / "site.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700


def test_expired_token_is_refused(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    token = lab.b.ferry("pair-token", "--ttl", "1s").stdout.strip()
    time.sleep(1.5)
    proc = lab.a.ferry("pair", lab.b.address, "--token", token, check=False)
    assert proc.returncode == EXIT_DENIED and "expired" in proc.stderr, proc.stderr
    assert lab.a.api("GET", "/v1/pairs")["peers"] == []
    assert lab.b.api("GET", "/v1/pairs")["peers"] == []


def test_wrong_secret_is_refused_then_burns_the_token(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    token = lab.b.ferry("pair-token").stdout.strip()
    token_id, secret = token.split(".")
    forged = token_id + "." + ("a" if secret[0] != "a" else "b") + secret[1:]
    for _attempt in range(tls.TOKEN_ATTEMPTS):
        proc = lab.a.ferry("pair", lab.b.address, "--token", forged, check=False)
        assert proc.returncode == EXIT_DENIED and "wrong secret" in proc.stderr, proc.stderr
    assert "now burnt" in proc.stderr
    proc = lab.a.ferry("pair", lab.b.address, "--token", token, check=False)
    assert proc.returncode == EXIT_DENIED and "already used" in proc.stderr, proc.stderr
    unknown = lab.a.ferry("pair", lab.b.address, "--token", "0badc0de." + "a" * 32,
                          check=False)
    assert unknown.returncode == EXIT_DENIED and "unknown token" in unknown.stderr
    assert lab.b.api("GET", "/v1/pairs")["peers"] == []


@pytest.mark.parametrize("token", ["", "nonsense", "1234.abc", "zzzzzzzz." + "a" * 32])
def test_malformed_token_is_refused_before_connecting(tls_lab: Lab, token: str) -> None:
    tls_lab.a.start()
    proc = tls_lab.a.ferry("pair", "127.0.0.1:9", "--token", token, check=False)
    expected = "token is required" if not token else "is not a pairing token"
    # An empty token is a request without one (1); a malformed one is refused (7).
    assert proc.returncode == (EXIT_DENIED if token else 1) and expected in proc.stderr, \
        proc.stderr


def test_pair_with_nothing_listening_or_not_a_ferry_port(tls_lab: Lab) -> None:
    lab = tls_lab
    metrics_port = free_port()
    lab.a.extra_args = ["--metrics", "127.0.0.1:%d" % metrics_port]
    lab.a.start()
    token = "0badc0de." + "a" * 32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = "127.0.0.1:%d" % s.getsockname()[1]
    proc = lab.a.ferry("pair", closed, "--token", token, check=False)
    assert proc.returncode == EXIT_UNAVAILABLE and "cannot reach" in proc.stderr, proc.stderr
    # The agent's own HTTP port (its metrics listener) speaks HTTP, not TLS.
    proc = lab.a.ferry("pair", "127.0.0.1:%d" % metrics_port, "--token", token, check=False)
    assert proc.returncode == EXIT_DENIED and "pairing with" in proc.stderr \
        and "Ferry agent's replication port" in proc.stderr, proc.stderr


def test_plaintext_to_a_tls_side_is_refused(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.a.insecure = True  # A speaks plain TCP; B only TLS
    lab.b.start()
    lab.a.start()
    in_log(lab.a, "--insecure: replication runs over PLAIN TCP")
    assert "runs --insecure" in lab.a.ferry("status").stdout
    assert "runs --insecure" not in lab.b.ferry("status").stdout
    _disk, proc = protect_vm1(lab, check=False)
    assert proc.returncode == EXIT_DENIED and "accepts only TLS" in proc.stderr \
        and "without --insecure" in proc.stderr and "ferry pair %s" % lab.b.address \
        in proc.stderr, proc.stderr
    in_log(lab.b, "refusing a plaintext connection")
    # A raw client sees an ERROR frame that says why, in the clear.
    codec = frames.Codec()
    host, port = lab.b.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(codec.encode(frames.T_HELLO, {"protocol": 1, "site": "plain"}))
        frame = _read_frame(s, codec)
    assert frame is not None
    assert frame[0] == frames.T_ERROR and frame[1]["code"] == frames.E_TLS_REQUIRED


def test_tls_without_a_paired_certificate_may_only_pair(tls_lab: Lab) -> None:
    """A TLS client with no certificate (as in pairing) that says HELLO is refused."""
    lab = tls_lab
    lab.b.start()
    codec = frames.Codec()
    host, port = lab.b.address.rsplit(":", 1)
    ctx = tls.pairing_context()
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=tls.SNI) as s:
            s.sendall(codec.encode(frames.T_HELLO, {"protocol": 1, "site": "nobody"}))
            frame = _read_frame(s, codec)  # type: ignore[arg-type]
    assert frame is not None
    assert frame[0] == frames.T_ERROR and frame[1]["code"] == frames.E_UNPAIRED
    in_log(lab.b, "TLS without a paired site's certificate")


def test_pairing_over_plaintext_is_refused(lab: Lab) -> None:
    """Even an --insecure site pairs only over TLS (the MACs bind TLS certificates)."""
    lab.b.start()
    codec = frames.Codec()
    host, port = lab.b.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(codec.encode(frames.T_PAIR, {"token": "0badc0de", "site": "x", "cert": "",
                                             "mac": b""}))
        assert _read_frame(s, codec) is None  # closed without a word
    in_log(lab.b, "refusing to pair with")


def test_unpaired_peer_is_refused_and_re_pairing_resumes(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    lab.a.pair_with(lab.b)
    disk, proc = protect_vm1(lab)
    uri = proc.stdout.split("\t")[1].strip()
    lab.a.ferry("wait", "vm1", "--synced", "--timeout", "60")
    # B forgets A: A's next connection is refused, A says how to pair, B logs why.
    assert "unpaired A" in lab.b.ferry("unpair", "A").stdout
    lab.a.ferry("pause", "vm1")  # end the session that is up
    lab.a.ferry("resume", "vm1")
    wait_for(lambda: lab.a.status("vm1")["groups"]["vm1"]["state"] == "target-unpaired",
             what="A to see it is no longer paired")
    error = lab.a.status("vm1")["groups"]["vm1"]["error"]
    assert "ferry pair-token" in error, error
    in_log(lab.b, "its certificate is not one of a paired site")
    missing = lab.b.ferry("unpair", "A", check=False)
    assert missing.returncode == EXIT_NOT_FOUND and "no paired site A" in missing.stderr
    # Writes go on meanwhile; pairing again lets replication catch up.
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(os.urandom(MiB), 5 * MiB)
    h.flush()
    h.shutdown()
    lab.a.pair_with(lab.b)
    write_and_check(lab, uri, disk)
    # Pairing again did not leave a second entry for A.
    assert len(lab.b.api("GET", "/v1/pairs")["peers"]) == 1


def test_tls_link_cut_and_corrupted(tls_lab: Lab) -> None:
    """Through the fault proxy: cuts and flipped bytes end TLS sessions (a flipped byte
    fails TLS's own integrity check); replication reconnects and ends identical."""
    lab = tls_lab
    lab.b.start()
    lab.a.start()
    lab.a.pair_with(lab.b)
    host, port = lab.b.address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        disk = lab.image("vda.img", SIZE)
        out = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                          proxy.address).stdout
        writer = Writer(out.split("\t")[1].strip(), 21)
        writer.start()
        time.sleep(1)
        proxy.cut()
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] != "replicating",
                 what="the source to see the cut")
        time.sleep(2)
        proxy.heal()
        time.sleep(1)
        proxy.corrupt(2)
        time.sleep(2)
        writer.finish()
        assert writer.max_latency < 2.0
        check_identical(lab, disk)
    assert proxy.connections >= 3


def test_token_and_mac_units() -> None:
    token_id, token = tls.new_token()
    assert tls.parse_token(token)[0] == token_id
    assert tls.parse_token(token.upper().replace(token_id.upper(), token_id))[1] \
        == tls.parse_token(token)[1]
    key = tls.parse_token(token)[1]
    a, b, m = b"cert-a", b"cert-b", b"cert-mitm"
    mac = tls.pair_mac(key, "source", a, b)
    assert tls.check_mac(key, "source", a, b, mac)
    assert not tls.check_mac(key, "target", a, b, mac)     # roles are not interchangeable
    assert not tls.check_mac(key, "source", a, m, mac)     # a man in the middle shows m
    assert not tls.check_mac(tls.key_from_secret("x" * 32), "source", a, b, mac)
    for bad in ("", "abc", "12345678", "12345678.short", "1234567g." + "a" * 32):
        with pytest.raises(tls.PairingError):
            tls.parse_token(bad)


async def test_tls_socket_stream_moves_bytes_and_ends_cleanly(tmp_path) -> None:
    """The agents' TLS stream: a large payload both ways, EOF as b"", use after close."""
    import functools

    import trio

    srv = tls.load_identity(str(tmp_path / "s"), "s")
    cli = tls.load_identity(str(tmp_path / "c"), "c")
    payload = os.urandom(3 * MiB + 5)
    got = []

    async def handler(stream: trio.SocketStream) -> None:
        s = tls.TLSSocketStream(stream, tls.server_context(srv, [cli.cert_pem]), True)
        await s.do_handshake()
        assert tls.peer_der(s) == cli.der
        data = bytearray()
        while len(data) < len(payload):
            data += await s.receive_some()
        await s.send_all(bytes(data[::-1]))
        assert await s.receive_some(10) == b""  # the client closed
        await s.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                          host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        c = tls.TLSSocketStream(await trio.open_tcp_stream("127.0.0.1", port),
                                tls.client_context(cli, [srv.cert_pem]), False)
        await c.do_handshake()
        await c.send_all(payload)
        back = bytearray()
        while len(back) < len(payload):
            back += await c.receive_some(65536)
        got.append(bytes(back))
        await c.wait_send_all_might_not_block()
        await c.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await c.receive_some(1)
        with pytest.raises(trio.ClosedResourceError):
            await c.send_all(b"x")
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert got == [payload[::-1]]


async def test_tls_socket_stream_refuses_a_stranger(tmp_path) -> None:
    import functools

    import trio

    srv = tls.load_identity(str(tmp_path / "s"), "s")
    cli = tls.load_identity(str(tmp_path / "c"), "c")
    other = tls.load_identity(str(tmp_path / "o"), "o")

    async def handler(stream: trio.SocketStream) -> None:
        s = tls.TLSSocketStream(stream, tls.server_context(srv, [cli.cert_pem]), True)
        with pytest.raises(trio.BrokenResourceError):
            await s.do_handshake()
        await s.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                          host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        # The client trusts another certificate than the server's: verify failure.
        c = tls.TLSSocketStream(await trio.open_tcp_stream("127.0.0.1", port),
                                tls.client_context(cli, [other.cert_pem]), False)
        with pytest.raises(trio.BrokenResourceError) as e:
            await c.do_handshake()
        assert tls.is_verify_failure(e.value)
        await c.aclose()
        nursery.cancel_scope.cancel()


def test_tls_reason_and_verify_failure_units() -> None:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrapped = RuntimeError("broken")
    wrapped.__cause__ = err
    assert tls.is_verify_failure(wrapped)
    assert not tls.is_verify_failure(RuntimeError("x"))
    assert tls.tls_reason(RuntimeError("plain")) == "plain"


# --- Trust's error branches, against small fake peers -----------------------------------------


def _trust(tmp_path, name: str = "A"):
    from agent.pairing import Trust
    from agent.store import Store

    data = str(tmp_path / name)
    return Trust(Store(data), tls.load_identity(data, name), name)


async def _serve(nursery, handler) -> int:
    """Serve ``handler`` on a loopback port in ``nursery``; the port."""
    import functools

    import trio

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_connect_and_pair_time_out_on_a_silent_peer(tmp_path, monkeypatch) -> None:
    import trio

    from agent import pairing

    monkeypatch.setattr(pairing, "HANDSHAKE_TIMEOUT", 0.5)
    trust = _trust(tmp_path)

    async def silent(stream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, silent)
        with pytest.raises(OSError, match="no TLS handshake"):
            await trust.connect("127.0.0.1", port, "x:%d" % port)
        with pytest.raises(tls.PairingError, match="did not answer"):
            await trust.pair("127.0.0.1", port, "x:%d" % port, "0badc0de." + "a" * 32)
        nursery.cancel_scope.cancel()


async def test_connect_to_something_that_is_not_tls(tmp_path) -> None:
    import trio

    trust = _trust(tmp_path)

    async def http(stream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, http)
        with pytest.raises(OSError, match="TLS with") as e:
            await trust.connect("127.0.0.1", port, "x:%d" % port)
        assert not isinstance(e.value, NotPaired)
        nursery.cancel_scope.cancel()


async def test_pair_refuses_a_target_without_proof(tmp_path) -> None:
    """A fake target that answers PAIRED without knowing the secret: nothing is kept."""
    import trio

    from agent.protocol import messages
    from agent.protocol.session import TargetSession
    from agent.protocol.stream import SessionStream

    trust = _trust(tmp_path)
    fake = tls.load_identity(str(tmp_path / "fake"), "fake")

    async def impostor(stream) -> None:
        s = tls.TLSSocketStream(stream, tls.server_context(fake, []), True)
        await s.do_handshake()
        fs = SessionStream(s, "source", TargetSession())
        await fs.expect(messages.Pair)
        await fs.send(messages.Paired("B", b"\0" * 32))
        await fs.aclose()

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, impostor)
        with pytest.raises(tls.PairingError, match="without proof"):
            await trust.pair("127.0.0.1", port, "x:%d" % port, "0badc0de." + "a" * 32)
        nursery.cancel_scope.cancel()
    assert trust.peers() == []


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "close"])
async def test_a_session_closed_after_the_handshake_means_not_paired(tmp_path, reset) -> None:
    """TLS 1.3: the target refuses our certificate after our handshake is done. Whether
    HELLO's send meets the reset or WELCOME's read meets the close, A says how to pair."""
    import struct

    import trio

    from agent.source import open_session, session_stream
    from agent.store import DiskRow, GroupRow

    srv = tls.load_identity(str(tmp_path / "s"), "s")
    cli = tls.load_identity(str(tmp_path / "c"), "c")
    closed = trio.Event()

    async def refuser(stream: trio.SocketStream) -> None:
        if reset:  # close() sends RST
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
        s = tls.TLSSocketStream(stream, tls.server_context(srv, [cli.cert_pem]), True)
        await s.do_handshake()
        await s.aclose()
        closed.set()

    row = GroupRow("vm1", "x", "async", 0, 0.0, [DiskRow("d", "vm1", 0, "vda", "/x", MiB)])
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, refuser)
        c = tls.TLSSocketStream(await trio.open_tcp_stream("127.0.0.1", port),
                                tls.client_context(cli, [srv.cert_pem]), False)
        await c.do_handshake()
        await closed.wait()
        await trio.sleep(0.1)  # the reset or FIN is here before HELLO goes
        with pytest.raises(NotPaired, match="ferry pair-token"):
            await open_session(session_stream(c, "x:%d" % port), row, "A", probe=True)
        await c.aclose()
        nursery.cancel_scope.cancel()


def test_target_drops_a_pair_without_a_certificate_and_a_silent_close(tls_lab: Lab) -> None:
    lab = tls_lab
    lab.b.start()
    codec = frames.Codec()
    host, port = lab.b.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10):
        pass  # connect and go: nothing to refuse but a log line
    in_log(lab.b, "closed the connection before a word")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with tls.pairing_context().wrap_socket(raw, server_hostname=tls.SNI) as s:
            s.sendall(codec.encode(frames.T_PAIR, {"token": "0badc0de", "site": "x",
                                                 "cert": "junk", "mac": b""}))
            frame = _read_frame(s, codec)  # type: ignore[arg-type]
    assert frame is not None and frame[0] == frames.T_ERROR
    assert frame[1]["code"] == frames.E_PROTOCOL and "no certificate" in frame[1]["message"]
