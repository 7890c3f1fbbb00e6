"""The cloud service (`cdcca-edge cloud serve`): the fleet's side of every round.

Embedded default: one process, SQLite in WAL mode for state (`store.py`), a
content-addressed blob directory for artefacts, bundles and deltas (`blobs.py`), and the
FastAPI app (`app.py`) under `/v1`. Protocol: docs/formats/sync.md.
"""
