"""factory stage (see DESIGN.md §2)."""
