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


def list_models() -> list[str]:
    """Every registered model as ``task/preset`` (e.g. ``text-lm/tiny``)."""
    from vlpretrain.train.task import list_models as _list_models

    return _list_models()


__all__ = ["__version__", "list_models"]
