"""Write the ``ferry`` man page or its bash completion, from the click commands themselves.

    python3 packaging/gendocs.py man OUT            # ferry.1 (roff)
    python3 packaging/gendocs.py bash-completion OUT

Run at package build time (debian/rules, the spec's %build) with the built tree first on
``sys.path``, so the page always describes the ``ferry`` it ships with. The date is
SOURCE_DATE_EPOCH's (set by dpkg-buildpackage and rpmbuild) for a reproducible page; the
version is the installed distribution's.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from typing import List

import click

SECTIONS_AFTER = r"""
.SH ENVIRONMENT
.TP
.B FERRY_API
URL of the agent's HTTP API, for every command but
.BR agent .
.SH FILES
.TP
.I /etc/ferry/agent.conf
The settings
.B ferry\-agent.service
starts the agent with; drop\-ins in
.I /etc/ferry/conf.d/*.conf
override it, in name order.
.TP
.I /var/lib/ferry
The agent's data directory: state, journals, replicas and splitter sockets.
It is kept when the package is removed.
.TP
.I /run/ferry
The agent's runtime directory.
.SH SEE ALSO
.BR nbdkit (1),
.BR systemctl (1),
.I /usr/share/doc/ferry/README.packaging.md
"""


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting a request."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        line = line.strip()
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    # Blank lines separate paragraphs.
    return "\n".join(".PP" if not line else line for line in out).strip()


def option_lines(ctx: click.Context, command: click.Command) -> List[str]:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", ".B " + roff(names), roff(help_text or "")]
    return lines


def man_page(group: click.Group, version: str, date: str) -> str:
    ctx = click.Context(group, info_name="ferry", **group.context_settings)
    lines = [
        '.TH FERRY 1 "%s" "ferry %s" "Ferry manual"' % (date, version),
        ".SH NAME",
        "ferry \\- continuous replication of KVM virtual machine disks",
        ".SH SYNOPSIS",
        ".B ferry",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        roff(group.help or ""),
        ".PP",
        "Each command has its own",
        ".BR \\-\\-help .",
        ".SH OPTIONS",
    ]
    lines += option_lines(ctx, group)
    lines.append(".SH COMMANDS")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        pieces = command.collect_usage_pieces(sub)
        lines += [".SS " + roff("ferry %s %s" % (name, " ".join(pieces))),
                  roff(command.help or command.short_help or "")]
        lines += option_lines(sub, command)
    return "\n".join(lines) + SECTIONS_AFTER


def find_group(module: object) -> click.Group:
    """The module's top-level click group (``agent.cli.cli`` today), whatever its name."""
    groups = [v for v in vars(module).values() if isinstance(v, click.Group)]
    top = [g for g in groups if not any(g in other.commands.values() for other in groups)]
    if len(top) != 1:
        raise SystemExit("gendocs.py: expected one top-level click group in %s, found %d"
                         % (getattr(module, "__name__", module), len(top)))
    return top[0]


def bash_completion() -> str:
    """click's own bash completion script for ``ferry`` (it asks ``ferry`` for the words)."""
    code = "import sys; from agent.cli import main; sys.exit(main())"
    env = dict(os.environ, _FERRY_COMPLETE="bash_source")
    # From /: the ferry on PYTHONPATH (the built tree), not a source tree in the cwd.
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False, cwd="/")
    if proc.returncode != 0 or "_ferry_completion" not in proc.stdout:
        raise SystemExit("gendocs.py: no bash completion from ferry:\n" + proc.stderr)
    return proc.stdout


def main(argv: List[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("man", "bash-completion"):
        print("usage: gendocs.py man|bash-completion OUT", file=sys.stderr)
        return 2
    if argv[1] == "man":
        from importlib.metadata import version

        import agent.cli

        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
        day = (datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch
               else datetime.datetime.now(datetime.timezone.utc))
        text = man_page(find_group(agent.cli), version("ferry"), day.strftime("%Y-%m-%d"))
    else:
        text = bash_completion()
    with open(argv[2], "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
