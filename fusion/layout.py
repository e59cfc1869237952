"""The adapter library's folders, one per artefact kind (no torch import: the command line offers them)."""

KIND_FOLDERS = {"adapter": "adapters", "head": "heads", "fusion": "fusions", "router": "routers"}
