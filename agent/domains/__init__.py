"""libvirt domains as what an administrator protects (issue 11, first part).

- ``xml``: a domain's writable disks, and its XML with them on (and off) Ferry's sockets.
- ``hypervisor``: the libvirt connection (``--libvirt-uri``, default qemu:///system).
- ``record``: what a group protected by domain remembers of its domains.
- ``service``: ``Domains``, protect and unprotect of a group of domains (offline attach).
"""

from .hypervisor import DEFAULT_URI
from .service import Domains

__all__ = ["DEFAULT_URI", "Domains"]
