"""The node daemon: its configuration file, its event loop (netlink, reloads,
retries) and its structured log."""
