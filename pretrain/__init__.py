"""pretrain stage (see DESIGN.md §2)."""
