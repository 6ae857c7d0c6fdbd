"""eval stage (see DESIGN.md §2)."""
