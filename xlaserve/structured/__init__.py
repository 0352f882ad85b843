"""Structured outputs: JSON schema, regex, choice and grammar constraints applied as a token
bitmask on the sampling rows (see `params.py`, `backend.py`, `manager.py`)."""
