"""A site's TLS identity (DATA/tls/site.crt and site.key) is never remade silently while
paired sites know it: the agent refuses to start, naming the missing file and the peers,
until the files are restored or the administrator says --new-identity."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import Lab

from lab.sites import FERRY, REPO


def start_fails(site, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FERRY, "agent", "--data", str(site.data), "--listen", site.address,
         "--api", site.api_url, "--site", site.name, *extra],
        capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_new_site_makes_its_identity(tls_lab: Lab) -> None:
    tls_lab.b.start()
    assert (tls_lab.b.data / "tls" / "site.crt").exists()
    assert (tls_lab.b.data / "tls" / "site.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("lost", ["site.key", "site.crt", "both"])
def test_a_paired_site_without_its_identity_refuses_to_start(tls_lab: Lab, lost: str) -> None:
    a, b = tls_lab.a, tls_lab.b
    b.start()
    a.start()
    a.pair_with(b)
    b.stop()
    saved = tls_lab.root / "tls-backup"
    shutil.copytree(b.data / "tls", saved)
    for name in (["site.key", "site.crt"] if lost == "both" else [lost]):
        (b.data / "tls" / name).unlink()
    before = sorted(p.name for p in (b.data / "tls").iterdir())
    out = start_fails(b)
    assert out.returncode == 5, out
    line = out.stderr.strip().splitlines()[-1]
    assert "identity" in line and "paired site" in line and a.name in line, line
    assert ("site.key" if lost != "site.crt" else "site.crt") in line, line
    assert "--new-identity" in line, line
    # Nothing was made meanwhile: the files the administrator may restore stay as they were.
    assert sorted(p.name for p in (b.data / "tls").iterdir()) == before
    # Restored from the backup: the site starts, with the identity its peers know.
    shutil.rmtree(b.data / "tls")
    shutil.copytree(saved, b.data / "tls")
    b.start()
    assert (b.data / "tls" / "site.crt").read_bytes() == (saved / "site.crt").read_bytes()


def test_new_identity_is_made_when_asked(tls_lab: Lab) -> None:
    a, b = tls_lab.a, tls_lab.b
    b.start()
    a.start()
    a.pair_with(b)
    b.stop()
    old = (b.data / "tls" / "site.crt").read_bytes()
    (b.data / "tls" / "site.key").unlink()
    b.extra_args.append("--new-identity")
    b.start()
    assert (b.data / "tls" / "site.crt").read_bytes() != old
    assert "making a new TLS identity" in b.log.read_text()


def test_half_an_identity_is_refused_on_an_unpaired_site(tls_lab: Lab) -> None:
    b = tls_lab.b
    b.start()
    b.stop()
    (b.data / "tls" / "site.crt").unlink()
    out = start_fails(b)
    assert out.returncode == 5, out
    assert "site.crt missing" in out.stderr, out.stderr
