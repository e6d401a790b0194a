"""Tests of wsss/errors.py: option names for messages."""

from wsss.errors import option_name


def test_option_names_of_config_fields():
    assert option_name("lr") == "--lr"
    assert option_name("batch_size") == "--batch-size"
    assert option_name("out_dir") == "--out" and option_name("reliability_dir") == "--reliability"
    assert option_name("compile_model") == "--compile" and option_name("evaluate") == "--eval"
