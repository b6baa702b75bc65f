"""Who may drive an agent: root and group ``ferry`` on the Unix socket, a token on TCP, and
nothing but /metrics and /healthz on the metrics listener."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from agent.client import Client
from agent.errors import EXIT_DENIED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, Forbidden, NotFound
from lab.sites import FERRY, REPO, Site, free_port

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to run as nobody")


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory every user can traverse (mkdtemp's 0700 would refuse them before the
    socket's own mode is asked)."""
    root = Path(tempfile.mkdtemp(prefix="fya", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def agent_site(home: Path, *extra: str, sock: str = "") -> Site:
    site = Site("A", home)
    site.api_url = "unix:" + (sock or str(home / "run" / "api.sock"))
    site.extra_args = list(extra)
    return site


def ferry_as(user_args: List[str], api: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*user_args, *FERRY, "--api", api, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def group() -> Iterator[str]:
    name = "fy%s" % uuid.uuid4().hex[:8]
    subprocess.run(["groupadd", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


@needs_root
def test_root_is_served_and_nobody_is_refused_on_a_root_only_socket(home: Path) -> None:
    site = agent_site(home, "--api-group", "nosuchgroup-ferry").start()
    try:
        sock = Path(site.api_url[5:])
        st = sock.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0
        assert "group nosuchgroup-ferry does not exist" in site.log.read_text()
        assert stat.S_IMODE((home / "run").stat().st_mode) == 0o755
        assert site.ferry("status", "--json").returncode == 0
        nobody = ["runuser", "-u", "nobody", "--"]
        for args in (["status"], ["pair-token"], ["pause", "g1"]):
            proc = ferry_as(nobody, site.api_url, *args)
            assert proc.returncode == EXIT_DENIED, proc.stderr
            assert "permission denied" in proc.stderr, proc.stderr
        with pytest.raises(NotFound):
            site.api("GET", "/v1/status?group=nosuch")
    finally:
        site.stop()
    assert not sock.exists()  # removed at a clean stop


@needs_root
def test_the_ferry_group_may_use_the_socket(home: Path, group: str) -> None:
    site = agent_site(home, "--api-group", group).start()
    try:
        sock = Path(site.api_url[5:])
        st = sock.lstat()
        import grp
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
        member = ["setpriv", "--reuid=65534", "--regid=65534",
                  "--groups=%d" % grp.getgrnam(group).gr_gid, "--"]
        proc = ferry_as(member, site.api_url, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        outsider = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        proc = ferry_as(outsider, site.api_url, "status")
        assert proc.returncode == EXIT_DENIED and "permission denied" in proc.stderr
    finally:
        site.stop()


def start_fails(site: Site) -> str:
    with pytest.raises(RuntimeError) as err:
        site.start(timeout=20)
    return str(err.value)


def test_a_planted_symlink_for_the_socket_directory_is_refused(home: Path) -> None:
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    (home / "run").symlink_to(elsewhere)
    text = start_fails(agent_site(home))
    assert "is not a directory (a symbolic link?)" in text, text
    assert list(elsewhere.iterdir()) == []


def test_a_socket_directory_others_can_write_is_refused(home: Path) -> None:
    (home / "run").mkdir()
    (home / "run").chmod(0o777)
    text = start_fails(agent_site(home))
    assert "writable by nobody else" in text, text


def test_a_file_in_the_sockets_place_is_not_replaced(home: Path) -> None:
    (home / "run").mkdir()
    (home / "run" / "api.sock").write_text("not a socket")
    text = start_fails(agent_site(home))
    assert "is not a socket: refusing to replace it" in text, text
    assert (home / "run" / "api.sock").read_text() == "not a socket"


def test_the_tcp_listener_needs_the_token(home: Path) -> None:
    port = free_port()
    site = agent_site(home, "--api", "127.0.0.1:%d" % port).start()
    try:
        url = "http://127.0.0.1:%d" % port
        proc = subprocess.run([*FERRY, "--api", url, "status"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == EXIT_DENIED and "needs the API token" in proc.stderr
        token = site.data / "api.token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        proc = subprocess.run([*FERRY, "--api", url, "--token-file", str(token), "status",
                               "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and '"site": "A"' in proc.stdout, proc.stderr
        wrong = home / "wrong.token"
        wrong.write_text("x" * 64)
        with pytest.raises(Forbidden):
            Client(url, str(wrong)).call("GET", "/v1/status")
        with pytest.raises(Forbidden):  # the dashboard's login refuses a wrong token too
            Client(url).call("GET", "/login?token=" + "x" * 64)
    finally:
        site.stop()


def test_a_tcp_listener_off_loopback_needs_tls(home: Path) -> None:
    text = start_fails(agent_site(home, "--api", "0.0.0.0:%d" % free_port()))
    assert "off loopback needs TLS" in text, text


def test_a_token_file_others_can_read_is_refused(home: Path) -> None:
    token = home / "token"
    token.write_text("t" * 64)
    token.chmod(0o644)
    text = start_fails(agent_site(home, "--api", "127.0.0.1:%d" % free_port(),
                                  "--api-token-file", str(token)))
    assert "can be read by other users" in text, text


def test_the_metrics_listener_serves_only_metrics(home: Path) -> None:
    port = free_port()
    site = agent_site(home, "--metrics", "127.0.0.1:%d" % port).start()
    try:
        client = Client("http://127.0.0.1:%d" % port)
        assert client.call("GET", "/healthz")["ok"] is True
        assert "ferry_build_info" in client.call("GET", "/metrics")
        for method, path in (("GET", "/v1/status"), ("POST", "/v1/pair-token"),
                             ("GET", "/"), ("POST", "/metrics")):
            with pytest.raises(NotFound):
                client.call(method, path)
    finally:
        site.stop()


def test_cli_exit_statuses(home: Path) -> None:
    proc = subprocess.run([*FERRY, "--api", "unix:%s/none.sock" % home, "status"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE and "cannot reach the agent" in proc.stderr
    proc = subprocess.run([*FERRY, "--api", "ftp://x", "status"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "the API is unix:PATH" in proc.stderr
    proc = subprocess.run([*FERRY, "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ferry 0."), proc.stdout
    site = agent_site(home).start()
    try:
        proc = site.ferry("pause", "nosuch", check=False)
        assert proc.returncode == EXIT_NOT_FOUND and "no group nosuch" in proc.stderr
        proc = site.ferry("unpair", "nosuch", "--json", check=False)
        assert proc.returncode == EXIT_NOT_FOUND
    finally:
        site.stop()


def test_client_refuses_a_token_file_it_cannot_read(home: Path) -> None:
    with pytest.raises(Exception, match="cannot read the token file"):
        Client("http://127.0.0.1:1", str(home / "missing"))
    empty = home / "empty"
    empty.write_text("")
    with pytest.raises(Exception, match="is empty"):
        Client("http://127.0.0.1:1", str(empty))


def test_a_socket_path_must_be_absolute() -> None:
    proc = subprocess.run([*FERRY, "agent", "--data", "/tmp/x", "--api", "unix:rel.sock"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "must be absolute" in proc.stderr
