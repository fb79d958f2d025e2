"""Figures for cunit files (registered once that schema lands)."""
