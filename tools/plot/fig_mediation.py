"""Figures for mediation files (registered once that schema lands)."""
