"""The bundled demo model: a tiny Llama trained on checkable synthetic tasks.

``ferry serve`` with no model serves it, so a fresh machine without network
can run the engine end to end and score its answers (see ``tasks.check``).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"

# Files without which the dir cannot be loaded as a HF model + tokenizer.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_model_path() -> Path:
    """Return the bundled demo model dir; raise if its files are missing."""
    missing = [name for name in _REQUIRED_FILES if not (DEMO_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The bundled demo model is incomplete: {', '.join(missing)} missing in "
            f"{DEMO_MODEL_DIR}. Reinstall ferry, or rebuild it with "
            "`python scripts/train_demo_model.py` (about 10 minutes on a CPU), "
            "or pass --model to use another model."
        )
    return DEMO_MODEL_DIR
