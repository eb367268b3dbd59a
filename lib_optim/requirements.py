"""The one list of what install.py may install: import name → pip requirement.

torch, torchvision and xformers are never here: the WebUI owns them, and a wrong build breaks it.
"""

RUNTIME_REQUIREMENTS: dict[str, str] = {
    "pynvml": "nvidia-ml-py>=12.535",  # GPU name, memory and driver without initialising CUDA
}

NEVER_INSTALL = frozenset({"torch", "torchvision", "torchaudio", "xformers"})
