"""Concept specs and the diversified forget/retain prompt sets built from them (RGD §3)."""
