"""File-level restore on the target site: ``mount`` a disk's file systems at a point
read-only under a directory, ``umount`` them (agent/target/mounts.py); and
``journal-volume``, a group's journal on its own block device (agent/target/volume.py)."""

from __future__ import annotations

import os
from typing import Optional

import click

from .app import Agent, call, cli, complete_groups, emit
from .recovery import point_body, point_options
from .units import iso, parse_size


@cli.command()
@click.argument("group", shell_complete=complete_groups)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--disk", required=True, help="The disk's name in the group.")
@point_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def mount(api: Agent, group: str, directory: str, disk: str, checkpoint: Optional[str],
          at: Optional[str], as_json: bool) -> None:
    """On the target site: mount DISK's file systems as of a point (default: the newest
    consistent state) read-only under DIRECTORY, an empty directory; one file system is
    mounted on DIRECTORY itself, partitions on DIRECTORY/p1, p2... Undo with ferry umount."""
    body = dict(point_body(checkpoint, at), disk=disk, dir=os.path.abspath(directory))
    result = call(api, "POST", "/v1/replicas/%s/mounts" % group, body, timeout=600)
    if as_json:
        return emit(result)
    c = result.get("checkpoint")
    click.echo("mounted %s/%s at %s read-only" % (
        group, disk, "checkpoint %s (%s)" % (c["id"], iso(c["wall_ns"])) if c
        else "its newest consistent state"))
    for fs in result["file_systems"]:
        click.echo("%s\t%s\t%s" % (fs["directory"], fs["type"], fs["device"]))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def umount(api: Agent, directory: str, as_json: bool) -> None:
    """On the target site: unmount what ferry mount mounted at DIRECTORY."""
    result = call(api, "POST", "/v1/umount", {"dir": os.path.abspath(directory)},
                  timeout=300)
    if as_json:
        return emit(result)
    click.echo("unmounted %s/%s from %s" % (result["group"], result["disk"],
                                           result["directory"]))


@cli.command("journal-volume")
@click.argument("group", shell_complete=complete_groups)
@click.argument("device", type=click.Path(dir_okay=False), required=False)
@click.option("--journal-max", metavar="SIZE",
              help="The journal limit the group will be protected with (protect "
                   "--journal-max): the device must hold it with its reserve.")
@click.option("--release", is_flag=True,
              help="Unmount GROUP's journal volume and forget it (a group this site does "
                   "not hold: never protected here, or its replica removed).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def journal_volume(api: Agent, group: str, device: Optional[str], journal_max: Optional[str],
                   release: bool, as_json: bool) -> None:
    """On the target site, before GROUP is protected: keep its journal on DEVICE, an unused
    block device (an LVM logical volume, a partition) or container file (raw, or a
    monolithicFlat VMDK, under the image roots; Ferry allocates all of it) that Ferry
    formats (ext4) and mounts on the group's journal directory. Refused for one in use, too
    small or holding a signature. With --release: give GROUP's volume back."""
    if release:
        if device is not None or journal_max is not None:
            raise click.UsageError("--release takes the group alone")
        result = call(api, "DELETE", "/v1/replicas/%s/journal-volume" % group, None,
                      timeout=300)
        if as_json:
            return emit(result)
        click.echo("group %s: journal volume %s unmounted and forgotten (file system %s)"
                   % (group, result["device"], result["uuid"]))
        return
    if device is None or journal_max is None:
        raise click.UsageError("give the DEVICE and --journal-max (or --release)")
    body = {"device": os.path.abspath(device), "journal_max": parse_size(journal_max)}
    result = call(api, "POST", "/v1/replicas/%s/journal-volume" % group, body, timeout=600)
    if as_json:
        return emit(result)
    click.echo("group %s: journal on %s (%d MiB, file system %s) mounted on %s" % (
        group, result["device"], result["size"] // (1024 * 1024), result["uuid"],
        result["journal"]))
