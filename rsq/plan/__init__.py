"""Before the work: preflight.py (checks that need no weights), memory.py (memory plans)."""
