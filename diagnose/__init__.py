"""diagnose stage (see DESIGN.md §2)."""


def __getattr__(name: str):
    """`diagnose.watch` / `diagnose.Monitor` / `diagnose.Alert` without importing torch at package import."""
    if name in ("watch", "Monitor", "Alert"):
        from diagnose import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'diagnose' has no attribute {name!r}")
