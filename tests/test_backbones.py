"""Loading a pretrained backbone says nothing a user cannot act on."""

from __future__ import annotations

import logging

import pytest
from transformers.utils import logging as hf_logging

from anchoralign.backbones import load_backbone


def test_minilm_loads_without_transformers_report_or_bar(capfd: pytest.CaptureFixture[str], caplog) -> None:
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with caplog.at_level(logging.WARNING):
        backbone, _ = load_backbone("minilm")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err + caplog.text and "Loading weights" not in out + err
    assert not any("pooler" in n for n, _ in backbone.named_parameters())
    # transformers' own settings are as they were.
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bar)
