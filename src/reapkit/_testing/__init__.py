"""The helpers behind :mod:`reapkit.testing`: fake ``/proc`` trees, sandbox cgroups, hogs."""
