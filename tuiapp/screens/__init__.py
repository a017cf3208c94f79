"""Screens of the Cherry app."""
