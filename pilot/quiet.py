"""Drop one message of torch's that says nothing about pilot's work, at its logger.

``torch.utils.cpp_extension`` (imported by torch.compile, pilot's CPU step) logs "No CUDA runtime is found, using
CUDA_HOME=..." on every machine that has a CUDA toolkit installed but no GPU. pilot builds no CUDA extension, and
its commands say which device they use, so a user reading that warning learns nothing but worries.
"""
from __future__ import annotations

import logging

__all__ = ["drop_cuda_home_notice"]

CUDA_HOME_NOTICE = "No CUDA runtime is found"


def _not_cuda_home_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(CUDA_HOME_NOTICE)


def drop_cuda_home_notice() -> None:
    """Drop torch.utils.cpp_extension's "No CUDA runtime is found" record; its other records still show."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _not_cuda_home_notice not in logger.filters:
        logger.addFilter(_not_cuda_home_notice)
