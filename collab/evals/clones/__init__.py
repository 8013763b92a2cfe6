"""Verbatim code: the hashed-window clone index, cross-organization clones, duplication."""
