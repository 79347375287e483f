"""The on-disk contract: see save.py and load.py."""
