"""Function-preserving rotations (spec §2)."""

from rsq.rotation.rotate import rotate_model

__all__ = ["rotate_model"]
