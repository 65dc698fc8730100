"""Issue 11: one units module. Memory sizes are binary (as Slurm reads them), counts decimal."""

from __future__ import annotations

import pytest

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.units import GIB, MIB, parse_count, parse_memory_bytes, parse_slurm_mem_mb


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100", 100),
        ("100B", 100),
        ("1K", 1024),
        ("0.5K", 512),
        ("512M", 512 * MIB),
        ("8G", 8 * GIB),
        ("8g", 8 * GIB),
        ("8GB", 8 * GIB),  # as Slurm reads --mem=8GB: never 8e9
        ("8GiB", 8 * GIB),
        ("8gib", 8 * GIB),
        ("8Gi", 8 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("2T", 2 * 1024 * GIB),
        ("1TiB", 1024 * GIB),
        ("2e9", 2_000_000_000),
        (".5M", MIB // 2),
    ],
)
def test_memory_sizes_are_binary(text: str, size: int) -> None:
    assert parse_memory_bytes(text, "--memory") == size


@pytest.mark.parametrize(
    ("text", "mb"),
    [("16000", 16000), ("64G", 65536), ("64g", 65536), ("512GB", 524288), ("1T", 1048576),
     ("2048K", 2), ("1K", 0), ("1KB", 0)],
)  # fmt: skip
def test_slurm_memory_in_mib(text: str, mb: int) -> None:
    assert parse_slurm_mem_mb(text, "mem") == mb


@pytest.mark.parametrize("text", ["1.5G", "64GiB", "100B", "1P", "-1G", "G", ""])
def test_slurm_memory_refuses_what_sbatch_refuses(text: str) -> None:
    with pytest.raises(InputError, match=r"^invalid job\.mem .*Slurm memory size"):
        parse_slurm_mem_mb(text, "job.mem")


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("7", 7.0),
        ("1.5e9", 1.5e9),
        ("1k", 1e3),
        ("1K", 1e3),
        ("300M", 3e8),
        ("5G", 5e9),
        ("2T", 2e12),
        ("1P", 1e15),
        ("0.25", 0.25),
    ],
)
def test_counts_are_decimal(text: str, count: float) -> None:
    assert parse_count(text, "--flops") == count


def test_g_means_two_things_only_by_name() -> None:
    """The point of the module: '1G' of memory is 2^30 bytes, '1G' FLOPs is 10^9."""
    assert parse_memory_bytes("1G", "--memory") == 2**30
    assert parse_count("1G", "--flops") == 1e9


def test_signed_counts_only_when_asked() -> None:
    assert parse_count("-0.5", "metric acc", signed=True) == -0.5
    assert parse_count("+2k", "metric acc", signed=True) == 2000.0
    with pytest.raises(InputError, match="must not have a sign"):
        parse_count("-1", "--flops")


@pytest.mark.parametrize(
    "text",
    [
        "5GiB",  # a count has no binary units
        "5GB",  # nor bytes
        "5g",  # SI prefixes are case-sensitive (m would be milli)
        "5m",
        "lots",
        "nan",
        "inf",
        "1e999",  # overflows a float
        "1e1234",
        " 5G",
        "5G ",
        "5G\n",
        "5 G",
        "\uff15G",  # fullwidth 5
        "\u0665",  # Arabic-Indic 5
        "",
    ],
)
def test_bad_counts_are_one_line_naming_the_option(text: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_count(text, "--flops")
    message = str(exc.value)
    assert message.startswith("invalid --flops ") and "\n" not in message


@pytest.mark.parametrize(
    "text",
    [
        "lots",
        "8P",  # memory units stop at T, as Slurm's do
        "8PiB",
        "8iB",
        "-1G",
        "nan",
        " 8G",
        "8G\n",
        "8 G",
        "\uff18G",  # fullwidth 8
        "8\u212aB",  # Kelvin sign, which a Unicode IGNORECASE would fold to k
        "",
    ],
)
def test_bad_memory_sizes_are_one_line_naming_the_option(text: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_memory_bytes(text, "--memory")
    message = str(exc.value)
    assert message.startswith("invalid --memory ") and "\n" not in message
    assert message.isascii()  # look-alike characters are shown escaped


def test_non_strings_are_input_errors() -> None:
    for parse in (parse_memory_bytes, parse_slurm_mem_mb, parse_count):
        with pytest.raises(InputError):
            parse(None, "--x")  # type: ignore[arg-type]
