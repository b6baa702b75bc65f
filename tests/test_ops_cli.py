"""Operations around the agent: the https API listener, ``ferry config check``, shell
completion, the splitter logs' rotation."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Tuple

import pytest
from conftest import Lab
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import logs
from agent.errors import EXIT_UNAVAILABLE
from lab.sites import FERRY, REPO, Site, free_port


def run(*args: str, env: dict = {}) -> subprocess.CompletedProcess:  # noqa: B006
    return subprocess.run([*FERRY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **env))


@pytest.fixture
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fyo", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def self_signed(directory: Path) -> Tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferry api test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_https_listener_with_a_token(home: Path) -> None:
    cert, key = self_signed(home)
    port = free_port()
    site = Site("A", home)
    site.extra_args = ["--api", "https://127.0.0.1:%d" % port, "--api-cert", str(cert),
                       "--api-key", str(key)]
    site.start()
    try:
        url = "https://127.0.0.1:%d" % port
        token = str(site.data / "api.token")
        ok = run("--api", url, "--cacert", str(cert), "--token-file", token, "status",
                 "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["site"] == "A", ok.stderr
        # By the environment, as a script would.
        ok = run("status", env={"FERRY_API": url, "FERRY_CACERT": str(cert),
                                "FERRY_TOKEN_FILE": token})
        assert ok.returncode == 0, ok.stderr
        untrusted = run("--api", url, "--token-file", token, "status")
        assert untrusted.returncode == EXIT_UNAVAILABLE and "TLS" in untrusted.stderr
        assert "https://127.0.0.1:%d/login?token=" % port in site.ferry("dashboard-url").stdout
    finally:
        site.stop()


def test_https_listener_needs_its_certificate(home: Path) -> None:
    site = Site("A", home)
    site.extra_args = ["--api", "https://127.0.0.1:%d" % free_port()]
    with pytest.raises(RuntimeError, match="needs --api-cert and --api-key"):
        site.start(timeout=20)


def write_conf(root: Path, text: str, dropin: str = "") -> Path:
    (root / "conf.d").mkdir(parents=True, exist_ok=True)
    (root / "agent.conf").write_text(text)
    if dropin:
        (root / "conf.d" / "50-site.conf").write_text(dropin)
    return root


def test_config_check(home: Path) -> None:
    hooks = home / "hooks"
    hooks.mkdir()
    good = write_conf(home / "good", "# defaults\n#FERRY_DATA=/x\n",
                      "FERRY_DATA=/var/lib/ferry\nFERRY_API=unix:/run/ferry/api.sock\n"
                      "FERRY_SITE='site a'\nFERRY_ARGS='--verbose --metrics 0.0.0.0:9100'\n")
    proc = run("config", "check", "--conf-dir", str(good), "--hooks", str(hooks), "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["ok"], result
    assert all(f["level"] == "warning" for f in result["findings"])
    (hooks / "10-open").write_text("#!/bin/sh\n")
    (hooks / "10-open").chmod(0o777)
    bad = write_conf(home / "bad", "FERRY_DATA=relative\nFERRY_LISTEN=host:99999\n"
                     "FERRY_API=0.0.0.0:9080\nFERRY_ARGS='--nope'\nFERRY_COLOUR=blue\n"
                     "echo hello\nFERRY_SITE='unclosed\n")
    proc = run("config", "check", "--conf-dir", str(bad), "--hooks", str(hooks))
    assert proc.returncode == 1
    out = proc.stdout
    for words in ("FERRY_DATA=relative: give an absolute path",
                  "FERRY_LISTEN: 'host:99999': the port must be",
                  "FERRY_API=0.0.0.0:9080: a TCP API off loopback needs https://",
                  "FERRY_ARGS=--nope: No such option",
                  "FERRY_COLOUR is not a setting", "not a plain NAME=value assignment",
                  "No closing quotation", "10-open is skipped", "5 error(s)"):
        assert words in out, (words, out)
    tcp = write_conf(home / "tcp", "FERRY_API=127.0.0.1:9080\nFERRY_API=unix:relative\n")
    proc = run("config", "check", "--conf-dir", str(tcp), "--hooks", str(hooks))
    assert proc.returncode == 1 and "FERRY_API: 'unix:relative'" in proc.stdout
    long_data = write_conf(home / "long", "FERRY_DATA=/%s\n" % ("x" * 90))
    assert "at most 85" in run("config", "check", "--conf-dir", str(long_data)).stdout
    afile = home / "afile"
    afile.write_text("")
    notdir = write_conf(home / "notdir", "FERRY_DATA=%s\n" % afile)
    assert "is not a directory" in run("config", "check", "--conf-dir", str(notdir)).stdout


def test_shell_completion() -> None:
    script = run(env={"_FERRY_COMPLETE": "bash_source"})
    assert script.returncode == 0 and "_ferry_completion" in script.stdout
    words = run(env={"_FERRY_COMPLETE": "bash_complete", "COMP_WORDS": "ferry jo",
                     "COMP_CWORD": "1"})
    assert words.stdout.split() == ["plain,job", "plain,jobs", "plain,journal-volume"]
    # A group name is asked of the agent; none answers here: no candidates, no error.
    groups = run(env={"_FERRY_COMPLETE": "bash_complete", "COMP_WORDS": "ferry pause g",
                      "COMP_CWORD": "2", "FERRY_API": "unix:/nonexistent.sock"})
    assert groups.returncode == 0 and groups.stdout.strip() == ""


def test_completion_of_group_names(sites: Lab) -> None:
    disk = sites.image("vda.img", 4 << 20)
    sites.protect("web", disk)
    words = run(env={"_FERRY_COMPLETE": "bash_complete", "COMP_WORDS": "ferry status w",
                     "COMP_CWORD": "2", "FERRY_API": sites.a.api_url})
    assert words.stdout.split() == ["plain,web"]


def test_splitter_logs_are_rotated(tmp_path: Path) -> None:
    big = tmp_path / "0123456789ab.log"
    big.write_bytes(b"x" * 2000)
    small = tmp_path / "small.log"
    small.write_bytes(b"y" * 10)
    (tmp_path / "other.txt").write_bytes(b"z" * 5000)
    (tmp_path / "link.log").symlink_to(big)
    assert logs.rotate(str(tmp_path), limit=1000) == [str(big)]
    assert big.stat().st_size == 0 and (tmp_path / "0123456789ab.log.1").stat().st_size == 2000
    assert small.read_bytes() == b"y" * 10
    with open(big, "ab") as f:  # O_APPEND writers go on at the start of the file
        f.write(b"after\n")
    assert big.read_bytes() == b"after\n"
    assert logs.rotate(str(tmp_path / "missing")) == []


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, subject: str,
          directory: Path, ip: str = "") -> Tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(ca_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / (subject + ".crt"), directory / (subject + ".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_listener_with_client_certificates(home: Path) -> None:
    ca_cert, ca_key_path = self_signed(home)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate(ca_cert.read_bytes()).subject
    server_cert, server_key = issue(ca_key, ca_name, "server", home, "127.0.0.1")
    client_cert, client_key = issue(ca_key, ca_name, "admin", home)
    other = home / "other"
    other.mkdir()
    stranger_cert, stranger_key = self_signed(other)  # signed by nobody the agent trusts
    port = free_port()
    site = Site("A", home)
    site.extra_args = ["--api", "https://127.0.0.1:%d" % port, "--api-cert", str(server_cert),
                       "--api-key", str(server_key), "--api-client-ca", str(ca_cert)]
    site.start()
    try:
        url = "https://127.0.0.1:%d" % port
        ok = run("--api", url, "--cacert", str(ca_cert), "--cert", str(client_cert), "--key",
                 str(client_key), "status", "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["site"] == "A", ok.stderr
        assert not (site.data / "api.token").exists()  # no token on this listener
        for args in ([], ["--cert", str(stranger_cert), "--key", str(stranger_key)]):
            refused = run("--api", url, "--cacert", str(ca_cert), *args, "status")
            assert refused.returncode == EXIT_UNAVAILABLE, refused.stderr
        bad = run("--api", url, "--cert", str(home / "missing.crt"), "status")
        assert bad.returncode == 1 and "cannot load the client certificate" in bad.stderr
    finally:
        site.stop()
