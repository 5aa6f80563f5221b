"""The kernel layer: system calls, cgroup discovery, the proc connector socket, the probe."""
