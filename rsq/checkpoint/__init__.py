"""The on-disk contract: see save.py and load.py."""

from rsq.checkpoint.save import save_checkpoint

__all__ = ["save_checkpoint"]
