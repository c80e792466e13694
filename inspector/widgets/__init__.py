"""Widgets of the kvscope TUI, one concern per file."""
