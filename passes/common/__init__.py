"""Machinery shared by every pass family: written once, called by each pass."""
