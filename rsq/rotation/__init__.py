"""Function-preserving rotations (spec §2). ``rotate_model`` lives in rotate.py; importing it here
lazily keeps rsq.rotation.hadamard free of the model-level imports (rsq.nn uses it)."""


def rotate_model(model, adapter, cfg):
    from rsq.rotation.rotate import rotate_model as _rotate

    return _rotate(model, adapter, cfg)


__all__ = ["rotate_model"]
