"""The agent's HTTP API (JSON), served by hypercorn on trio.

    GET    /v1/status[?group=NAME]          this site's groups (source) and replicas (target)
    POST   /v1/groups                       protect: {name, target, disks: [{name, path}],
                                            allow_unreachable?, queue_bytes?,
                                            seeds?: {disk: path on site B}}
    DELETE /v1/groups/NAME                  unprotect
    POST   /v1/groups/NAME/wait             {timeout}: return once synced (504 if not)
    POST   /v1/groups/NAME/settings         {bandwidth}: change the link's limit now
    POST   /v1/groups/NAME/pause, .../resume  stop / restart shipping (kept across restarts)
    POST   /v1/groups/NAME/checkpoints      {tag?, timeout?}: cut a user checkpoint (source)
    POST   /v1/groups/NAME/move             {timeout?}: planned move to the target, no loss
    POST   /v1/groups/NAME/failback         {target, timeout?, wait?}: protect the live disks
                                            back onto the old source's original disks
    POST   /v1/groups/NAME/resize           {disk}: replicate a disk that grew at its new size
    POST   /v1/groups/NAME/resync           {disk, ranges?}: read ranges again and ship them
    POST   /v1/groups/NAME/verify           {disk?, chunk?, rounds?, settle?, repair?}:
                                            compare the disks with site B's copy (online)
    POST   /v1/replicas/NAME/repair         {disk, ranges?}: ask the source for ranges again
    POST   /v1/replicas/NAME/rebuild-meta   {disks?}: meta.json made again (journal, replicas)
    GET    /v1/checkpoints/NAME             {"source": [...] | null, "target": [...] | null}
    POST   /v1/replicas/NAME/views          {checkpoint?, at_ns?, test?, overlay?}: serve a
                                            point (target); overlay: FILE or {disk: FILE}
    DELETE /v1/views/ID                     close a view
    POST   /v1/replicas/NAME/journal-volume {device, journal_max}: the group's journal on its
                                            own block device or container file, before it is
                                            protected (target)
    DELETE /v1/replicas/NAME/journal-volume unmount and forget it (a group not held here)
    POST   /v1/replicas/NAME/failover       {mode: test|stop-test|live, checkpoint?, at_ns?}
    POST   /v1/replicas/NAME/resolve        {keep: a|b} | {drop_kept: true}: a split brain
    POST   /v1/replicas/NAME/restore        {disk, to, checkpoint?, at_ns?}: a disk to a file
    POST   /v1/replicas/NAME/mounts         {disk, dir, checkpoint?, at_ns?}: mount read-only
    POST   /v1/umount                       {dir}: undo such a mount
                                            (default: its newest consistent state)
    POST   /v1/pair-token                   {ttl?}: a one-time pairing token (this site)
    POST   /v1/pairs                        {address, token}: pair with the site there
    GET    /v1/pairs                        this site's fingerprint and paired sites
    DELETE /v1/pairs/SITE                   forget a paired site (by name or fingerprint)
    GET    /v1/events?after=ID&wait=S&limit=N  events after ID, waiting up to S s (long poll)
    GET    /v1/alerts                       alerts raised now, and the alert settings
    POST   /v1/groups/NAME/alerts           {rpo_alert: seconds | null}
    GET    /v1/overview                     what the dashboard draws
    POST   /v1/jobs                         {kind: restore|wait|failover, group, ...the
                                            synchronous endpoint's body}: 202, the job
    GET    /v1/jobs, /v1/jobs/ID[?wait=S]   jobs; one job, waiting up to S s for its end
    GET    /metrics                         Prometheus text format (agent/metrics.py)
    GET    /healthz                         {ok, site}
    GET    /v1/dashboard-url                the dashboard's login addresses (local socket only)
    GET    /, /ui/FILE                      the dashboard (agent/web/)

Errors are ``{"error": "one line for the user", "kind"}`` with a 4xx status for any bad
input (a 5xx only for this site's own failures). docs/api.md gives every route's fields,
types, bounds and statuses; ``request.py`` enforces them.

``app.py`` holds ``Api``, the ASGI application, and its request and answer plumbing;
``request.py`` reads and checks a request's body; the routes live by what they serve:
``monitoring.py`` (status, metrics, healthz, events, alerts, overview, dashboard-url),
``groups.py`` (/v1/groups, /v1/checkpoints), ``pairing.py``, ``replicas.py`` (views,
failover, restore) and ``jobs.py``.
"""

from .app import Api, version

__all__ = ["Api", "version"]
