"""The embedded safety world: a small trained LLaVA whose behaviour mirrors the DAVSP setting.

`MODEL_DIR` holds the shipped model (Hugging Face format, built by `davsp toy build`); the world's
splits and scoring live in `davsp.toy.world`, the steering-causality check in `davsp.toy.steering`.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
