"""Third-party messages the user can do nothing about, filtered narrowly — by message and by
the module that emits them, never globally — when the library loads a model (``models``):

* transformers' FutureWarning that ``is_gradient_checkpointing`` is deprecated (raised inside
  transformers on every model load; our code never calls it);
* bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" log line (an
  optional faster CPU kernel, looked up on every import on AVX-512-BF16 CPUs, also without
  QLoRA; the ordinary kernel is used).

Everything else still reaches the console and the Prefect logs.
"""
from __future__ import annotations

import logging
import warnings

_INSTALLED = False


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Install the filters (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers(\.|$)")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    _INSTALLED = True
