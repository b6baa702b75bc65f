"""The target role: site B's half of replication, one room a concept.

    server.py      TargetSite: accept loop, handshake, per-session opening, the groups held,
                   what the API asks (restore, views, failover, status)
    messages.py    the OPEN and BATCH bodies as site B reads them
    intake.py      the receive loop: read ahead, group commit, ACK
    group.py       TargetGroup: open, accept, the lock, the group's life as a table
    admission.py   which records and checkpoints of a batch are admitted (logic only)
    applier.py     journal into replicas, promotion, replica checkpoints
    holdback.py    the hold-back rule, once: a disk's phases as a table (logic only)
    restore.py     a disk as of a point, written out
    failover.py    failover live, commit, rollback: a state table saved in meta.json
    live.py        a live failover's commit and rollback as the API asks them
    status.py      the status snapshot a group publishes and the event loop reads
    state.py       DiskState, and GroupData: the group as the rooms above see it
    meta.py        meta.json, read and written here only
    journal.py     the journal's segment files;  views.py: point-in-time views over NBD
    exports.py     one nbdkit export that outlives its starter (pid file, adopt, stop)
    seeds.py       site B's half of pre-seeded sync;  transitions.py: state tables
"""

from .group import NoConsistentState, SizeMismatch, TargetGroup
from .server import TargetSite

__all__ = ["NoConsistentState", "SizeMismatch", "TargetGroup", "TargetSite"]
