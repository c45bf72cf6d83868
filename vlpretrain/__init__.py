"""vlpretrain: pretrain, run and evaluate vision-language models that read and write images like a language.

Three published systems on one core: LaVIT (dynamic discrete visual tokens in a unified LM), LCL (vision-encoder
pretraining by latent compression on interleaved data) and Libra (routed visual experts in a frozen LLM).
Importing the package has no side effects; the command line lives in :mod:`vlpretrain.cli`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlpretrain")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
