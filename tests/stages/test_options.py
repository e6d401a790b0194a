"""Tests of stages/options.py: every number a user types is finite and in range before any work starts."""

import click
import pytest
from click.testing import CliRunner

from wsss.stages import options
from wsss import evaluation


def _command(**option_kwargs):
    @click.command()
    @click.option("--value", **option_kwargs)
    def command(value):
        click.echo(repr(value))
    return command


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_finite_float_refuses_nan_and_infinities_naming_the_option(text):
    result = CliRunner().invoke(_command(type=options.FiniteFloat()), ["--value", text])
    assert result.exit_code == 2
    assert f"Error: Invalid value for '--value': '{text}' is not a finite number." in result.output


@pytest.mark.parametrize("kwargs, text, accepted", [
    ({"min": 0, "min_open": True}, "0.001", True),
    ({"min": 0, "min_open": True}, "0", False),
    ({"min": 0, "min_open": True}, "-1", False),
    ({"min": 0, "max": 1, "max_open": True}, "0.999", True),
    ({"min": 0, "max": 1, "max_open": True}, "1", False),
    ({}, "-3.5", True),
])
def test_finite_float_keeps_the_range_of_float_range(kwargs, text, accepted):
    result = CliRunner().invoke(_command(type=options.FiniteFloat(**kwargs)), ["--value", text])
    assert (result.exit_code == 0) is accepted, result.output
    if accepted:
        assert result.output.strip() == repr(float(text))
    else:
        assert "is not in the range" in result.output


def test_sgd_options_refuse_a_negative_learning_rate_and_momentum_of_one():
    @click.command()
    @options.sgd_options(lr=0.1, head="Head")
    def command(**values):
        click.echo(sorted(values.items()))
    assert CliRunner().invoke(command, ["--lr", "-1"]).exit_code == 2
    assert CliRunner().invoke(command, ["--momentum", "1"]).exit_code == 2
    assert CliRunner().invoke(command, ["--weight-decay", "inf"]).exit_code == 2
    result = CliRunner().invoke(command, ["--lr", "0.5", "--momentum", "0"])
    assert result.exit_code == 0 and "('lr', 0.5)" in result.output and "('momentum', 0.0)" in result.output


@pytest.mark.parametrize("text", ["nan", "1,inf", "0.5,nan,1"])
def test_comma_lists_refuse_nan_and_infinities(text):
    with pytest.raises(click.BadParameter, match="finite"):
        options.float_list(text)
    with pytest.raises(click.BadParameter):
        options.positive_scales(None, None, text)


def test_positive_pair_and_scales():
    assert options.positive_pair(None, None, "0.5,1.5") == (0.5, 1.5)
    assert options.positive_scales(None, None, "1.0, 0.5") == (1.0, 0.5)
    for text in ("1.5,0.5", "0,1", "1", "nan,1"):
        with pytest.raises(click.BadParameter):
            options.positive_pair(None, None, text)


def test_fixed_floats_checks_count_sign_and_positive_widths():
    parse = options.fixed_floats(3, "SXY,SRGB,COMPAT", positive=(0, 1))
    assert parse(None, None, "50,5,0") == (50.0, 5.0, 0.0)  # a compatibility of 0 turns a kernel off
    with pytest.raises(click.BadParameter, match=r"SRGB must be > 0 \(SXY,SRGB,COMPAT\), got '50,0,10'"):
        parse(None, None, "50,0,10")
    with pytest.raises(click.BadParameter, match=r"COMPAT must be >= 0"):
        parse(None, None, "50,5,-1")
    with pytest.raises(click.BadParameter, match="finite"):
        parse(None, None, "nan,nan,nan")  # pydensecrf crashed with a segmentation fault on this
    with pytest.raises(click.BadParameter, match="expected 3 comma-separated numbers"):
        parse(None, None, "1,2")


def test_sweep_is_bounded_and_checked_at_parse_time():
    assert options.parse_range("0.05:0.60:0.01") == (0.05, 0.6, 0.01)
    assert len(evaluation.threshold_range(0, 0.9999, 1e-4)) == 10_000  # 0, 1e-4, ..., 0.9999: the most allowed
    with pytest.raises(click.BadParameter, match="holds 10001 thresholds"):
        options.parse_range("0:1:1e-4")
    with pytest.raises(click.BadParameter, match="holds 1000000000 thresholds; at most 10000"):
        options.parse_range("0:1:1e-9")  # asked for 3 TiB of confusion matrices before
    for text in ("0:1", "a:b:c", "0.5:0.1:0.1", "0:1:0", "nan:1:0.1", "0:inf:0.1"):
        with pytest.raises(click.BadParameter):
            options.threshold_range(None, None, text)
