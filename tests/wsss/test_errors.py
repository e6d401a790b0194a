"""Tests of wsss/errors.py: option names for messages and the finite-number check of settings."""

from dataclasses import dataclass

import numpy as np
import pytest

from wsss.errors import check_finite_fields, non_finite_field, option_name


def test_option_names_of_config_fields():
    assert option_name("lr") == "--lr"
    assert option_name("batch_size") == "--batch-size"
    assert option_name("out_dir") == "--out" and option_name("reliability_dir") == "--reliability"
    assert option_name("compile_model") == "--compile" and option_name("evaluate") == "--eval"


@dataclass(frozen=True)
class Settings:
    name: str = "x"
    flag: bool = True
    count: int = 3
    weight: float = 0.5
    other: float = 1.0


def test_the_first_non_finite_number_is_named():
    assert non_finite_field(Settings()) is None
    assert non_finite_field(Settings(weight=float("nan"), other=float("inf"))) == "weight"
    assert non_finite_field(Settings(other=np.float32("-inf"))) == "other"  # numpy scalars count too
    with pytest.raises(ValueError, match="other must be a finite number, got inf"):
        check_finite_fields(Settings(other=float("inf")))
