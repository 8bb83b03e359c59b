"""Operator commands (`pyoverlay status`, `doctor`, `network`, `dns-config`): they read the store
and this host, apart from the HTTP face in plugin/."""
