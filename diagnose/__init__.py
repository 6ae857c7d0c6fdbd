"""diagnose stage (see DESIGN.md §2)."""
