#!/usr/bin/env python3
"""Prints `export ALICE=… BOB=…`: demo JWTs (12 h) signed with the demo-only key, for the
curl lines of the docker-compose demo (`eval "$(.venv/bin/python scripts/demo_tokens.py)"`).
The same tokens `make run` prints (scripts/demo.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import mint  # noqa: E402

print(f"export ALICE='{mint('alice', ['billing'])}'   # groups: billing")
print(f"export BOB='{mint('bob', ['support'])}'       # groups: support")
