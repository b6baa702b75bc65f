"""libvirt domains as what an administrator protects (issue 11).

- ``xml``: a domain's writable disks, and its XML with them on (and off) Ferry's sockets,
  and as site B defines it.
- ``hypervisor``: the libvirt connection (``--libvirt-uri``, default qemu:///system), and a
  guest's file systems frozen and thawed through its qemu guest agent.
- ``record``: what a group protected by domain remembers of its domains (site A).
- ``live``: a running domain moved onto (and off) the splitters by a mirror and a pivot.
- ``service``: ``Domains``, protect and unprotect of a group of domains, its
  application-consistent checkpoints (and their schedule).
- ``quiesce`` and ``hooks``: guests frozen around a checkpoint, never left frozen; the
  domains' pre and post hooks.
- ``travel``: the definitions as they go to site B and are kept there.
- ``vms``: the domains defined and started on site B by a failover, removed by its end.
"""

from .hypervisor import DEFAULT_URI
from .service import Domains

__all__ = ["DEFAULT_URI", "Domains"]
