"""Errors a person can read: the message alone at the command line, hints in CLI syntax, no
object addresses, missing values called missing, dropped records in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import tagged_rows, write_image_files, write_jsonl
from test_report import _history, _summaries

from safegrpo_pl.core.errors import error_message, is_expected_error, model_not_found
from safegrpo_pl.core.records import ImageDecodeError, decode_image
from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.data.sources import BadRecordError
from safegrpo_pl.policy.model import load_model_config
from safegrpo_pl.run.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(tmp_path: Path, change: dict, drop: tuple[str, ...] = ()) -> Path:
    rows = tagged_rows(6)
    for row, name in zip(rows, write_image_files(tmp_path, 6), strict=True):
        row["image"] = name
    rows[2].update(change)
    for key in drop:
        del rows[2][key]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def _setup(data: Path, tmp_path: Path, **kwargs) -> SafeTagDataModule:
    dm = SafeTagDataModule(str(data), batch_size=2, cache_dir=str(tmp_path / "hf"), **kwargs)
    dm.setup("fit")
    return dm


def test_a_bad_record_hint_uses_the_command_line_syntax_and_says_how_records_count(tmp_path):
    with pytest.raises(BadRecordError) as err:
        _setup(_jsonl(tmp_path, {"text_tag": "maybe"}), tmp_path)
    message = str(err.value)
    assert "--data.on_bad_record skip" in message and "on_bad_record='skip'" not in message
    assert "record 2 (" in message and "records count from 0" in message


@pytest.mark.parametrize("absent", [True, False], ids=["key absent", "null"])
def test_a_missing_tag_is_reported_as_missing_not_as_a_bad_value_none(tmp_path, absent):
    data = _jsonl(tmp_path, {} if absent else {"combine_tag": None}, ("combine_tag",) * absent)
    with pytest.raises(BadRecordError, match=r"combine_tag is missing") as err:
        _setup(data, tmp_path)
    assert "None" not in str(err.value)


def test_a_corrupt_image_message_holds_no_object_address():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"definitely not an image")
    assert "0x" not in str(err.value) and "object at" not in str(err.value), str(err.value)


def test_an_unreachable_model_gets_one_message_naming_the_key_and_the_alternatives():
    # offline: tests/conftest.py sets HF_HUB_OFFLINE before the hub client is imported
    with pytest.raises(OSError) as err:
        load_model_config("no-such-org/no-such-model")
    message = str(err.value)
    assert message.startswith("model.policy.name_or_path: cannot load 'no-such-org/no-such-model'")
    assert "local folder" in message and "tiny:qwen2_5_vl" in message
    assert "\n" not in message


def test_expected_errors_are_ours_and_bugs_are_not():
    ours = model_not_found("x/y", OSError("offline"))
    assert is_expected_error(ours)
    try:
        _setup_raises_value_error()
    except ValueError as err:
        assert is_expected_error(err), "a ValueError raised by safegrpo_pl is a check"
    try:
        int("not a number")  # raised inside Python itself: a bug, keep its traceback
    except ValueError as err:
        assert not is_expected_error(err)
    assert not is_expected_error(RuntimeError("boom"))
    assert "--debug" in error_message(ours) and "SAFEGRPO_DEBUG=1" in error_message(ours)


def _setup_raises_value_error() -> None:
    from safegrpo_pl.train.warmup import WarmupSettings

    WarmupSettings(steps=0)


def test_dropped_records_go_into_the_report(tmp_path):
    before, after = _summaries()
    files = write_report(
        tmp_path,
        before,
        after,
        _history(),
        wall_time_s=1.0,
        steps=2,
        dropped_records={"bad_tag": 2, "missing_image": 1},
    )
    assert json.loads(files.json.read_text())["dropped_records"] == {
        "bad_tag": 2,
        "missing_image": 1,
    }
    assert "Records dropped when the data was loaded: 3 (bad_tag 2, missing_image 1)." in (
        files.markdown.read_text()
    )


def _cli(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SAFEGRPO_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SAFEGRPO_DEBUG", None)
    if debug:
        env["SAFEGRPO_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "safegrpo_pl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_cli_prints_a_bad_record_without_traceback_unless_debugging(tmp_path):
    data = _jsonl(tmp_path, {"image_tag": "maybe"})
    args = (
        "fit",
        "--model.policy.name_or_path",
        "tiny:qwen2_5_vl",
        "--data.dataset",
        str(data),
        "--data.batch_size",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    )
    quiet = _cli(tmp_path, *args)
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr, quiet.stderr[-2000:]
    assert "error: dataset 'data' split 'train' record 2" in quiet.stderr
    assert "--data.on_bad_record skip" in quiet.stderr
    loud = _cli(tmp_path, *args, debug=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


@pytest.mark.slow
def test_the_cli_names_the_model_key_once_when_a_model_cannot_be_found(tmp_path):
    result = _cli(tmp_path, "fit", "--model.policy.name_or_path", "no-such-org/no-such-model")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("model.policy.name_or_path") == 1
