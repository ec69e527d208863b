"""The small model that ships inside the package, trained on the shapes world by ``unidiffuser recipe shapes``.

Its files live in ``unidiffuser/models/shapes/`` in our own layout (``unidiffuser.json`` plus one
safetensors file per component), so ``UniDiffuser.from_pretrained`` reads it like any saved model.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "models" / "shapes"


def shipped_model_dir() -> Path:
    """The folder of the shipped shapes model.

    Raises:
        FileNotFoundError: the package was installed without its model files.
    """
    if not (SHIPPED_DIR / "unidiffuser.json").is_file():
        raise FileNotFoundError(
            f"the shipped model is missing from {SHIPPED_DIR}: reinstall the package "
            "(pip install -e .), or pass --model DIR with a model you trained or converted"
        )
    return SHIPPED_DIR


def load_shipped(device: str = "cpu"):
    """The shipped shapes model as a ``UniDiffuser`` pipeline on ``device``."""
    from .pipeline import UniDiffuser

    return UniDiffuser.from_pretrained(shipped_model_dir()).to(device)
