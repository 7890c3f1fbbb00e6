"""Formats and math shared by device and cloud: artefact access, identity, errors.

stdlib + numpy (+ gguf) only; never imports anything above it.
"""
