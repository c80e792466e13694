"""Screens of the kvscope TUI: chat, inspector, model info."""
