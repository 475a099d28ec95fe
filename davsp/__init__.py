"""davsp: Deep Aligned Visual Safety Prompts (DAVSP, AAAI 2026) for vision-language models.

Workflow: load a model -> extract the harmfulness vector -> train a VSP -> generate under a
defense -> judge -> evaluate -> report.
"""

from .adapters import load_adapter
from .config import TrainConfig
from .data.records import Record, load_records
from .defenses import DEFENSES, SAFETY_PREFIX
from .errors import DavspError
from .generate import generate_responses
from .prompt import VisualSafetyPrompt, apply_frame
from .train import train_vsp
from .vector import HarmfulnessVector, extract_harmfulness_vector

__version__ = "0.1.0"

__all__ = [
    "load_adapter",
    "load_records",
    "Record",
    "extract_harmfulness_vector",
    "HarmfulnessVector",
    "TrainConfig",
    "train_vsp",
    "VisualSafetyPrompt",
    "apply_frame",
    "generate_responses",
    "SAFETY_PREFIX",
    "DEFENSES",
    "DavspError",
]
