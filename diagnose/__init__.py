"""diagnose stage (see DESIGN.md §2)."""


def __getattr__(name: str):
    """`diagnose.watch` / `Monitor` / `Alert` and the sinks (`diagnose.sinks`) without importing torch at package import."""
    if name == "watch":
        from diagnose.api import watch

        return watch
    if name in ("Monitor", "Alert"):
        from diagnose import monitor

        return getattr(monitor, name)
    if name in ("MonitorCallback", "TensorBoardSink", "WandbSink", "SinkConfig"):
        from diagnose import sinks

        return getattr(sinks, name)
    raise AttributeError(f"module 'diagnose' has no attribute {name!r}")
