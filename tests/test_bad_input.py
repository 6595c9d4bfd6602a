"""Bad input, tried on purpose: each kind gets an error that names the record, the field and the
fix, or a counted skip, and never a hang, a traceback or memory exhaustion. One test per row of
the README's table ("Bad input, and what it gets")."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from data_fixtures import tagged_rows, write_image_files, write_jsonl
from fake_judge import FakeJudge
from PIL import Image

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.data.sources import BadRecordError
from safegrpo_pl.eval.catalog import load_benchmark
from safegrpo_pl.eval.demo_benchmarks import write_figstep, write_mossbench

ROOT = Path(__file__).resolve().parents[1]


def _rows(root: Path, count: int = 6) -> list[dict[str, Any]]:
    rows = tagged_rows(count)
    for row, name in zip(rows, write_image_files(root, count), strict=True):
        row["image"] = name
    return rows


def _setup(data: Path, tmp_path: Path, **kwargs: Any) -> SafeTagDataModule:
    module = SafeTagDataModule(
        dataset=str(data), cache_dir=str(tmp_path / "hf_cache"), batch_size=1, **kwargs
    )
    module.setup("fit")
    return module


def _with_image(tmp_path: Path, image: str, content: bytes | None = None) -> Path:
    """A valid jsonl whose record 2 has `image` (written with `content` when given)."""
    rows = _rows(tmp_path)
    if content is not None:
        (tmp_path / image).write_bytes(content)
    rows[2]["image"] = image
    return write_jsonl(tmp_path / "data.jsonl", rows)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels in 68 bytes (a decompression bomb's
    header: the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


# -- files ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_empty_data_file_is_one_error_at_the_command_line(tmp_path: Path, run_main) -> None:
    """It used to end in 30 lines and `StopIteration`."""
    (tmp_path / "empty.jsonl").write_text("")
    status, _, err = run_main(
        "fit", "--config", "configs/tiny.yaml", "--data.dataset", str(tmp_path / "empty.jsonl"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert status == 1, err[-2000:]
    assert "Traceback" not in err and "StopIteration" not in err
    assert f"error: dataset file {str(tmp_path / 'empty.jsonl')!r} is empty" in err


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("blank.jsonl", "\n \n", "is empty; expected one JSON object per line"),
        ("empty.csv", "", "is empty; expected a header line"),
        ("header.csv", "prompt,image,image_tag,text_tag,combine_tag\n", "has a header and no"),
    ],
)
def test_an_empty_or_header_only_file_is_named(tmp_path: Path, name: str, text: str, says: str):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"dataset file .*{name}' {says}"):
        _setup(tmp_path / name, tmp_path)


def test_a_jsonl_line_that_is_a_list_is_named_by_its_line(tmp_path: Path) -> None:
    rows: list[Any] = _rows(tmp_path)
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[2] = "[1, 2]"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl': line 3 is a JSON list; expected one JSON"):
        _setup(path, tmp_path)


def test_a_non_utf8_csv_says_so_with_the_fix(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[1]["prompt"] = "Décris cette image."  # é in Latin-1 is the single byte 0xe9
    path = tmp_path / "latin.csv"
    with path.open("w", encoding="latin-1", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte b'\\xe9' .*iconv"):
        _setup(path, tmp_path)


# -- records --------------------------------------------------------------------------------


def test_the_same_id_twice_is_an_error_naming_both_records(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    rows[4]["id"] = rows[1]["id"]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(BadRecordError, match=r"record 4 .*id is 'row-001', as record 1's") as err:
        _setup(path, tmp_path)
    assert err.value.kind == "duplicate_id"
    module = _setup(path, tmp_path, on_bad_record="skip")
    assert module.bad_record_counts == {"duplicate_id": 1}, "the second copy is dropped, counted"


def test_a_one_megabyte_instruction_is_dropped_and_counted_quickly(
    tmp_path: Path, tiny_qwen25vl_path: Path
) -> None:
    rows = _rows(tmp_path)
    rows[2]["prompt"] = "Tell me everything. " * 55_000  # 1.05 MB
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    start = time.perf_counter()
    module = _setup(path, tmp_path, processor=str(tiny_qwen25vl_path))
    assert time.perf_counter() - start < 120, "a long prompt must be measured, not stall setup"
    assert module.bad_record_counts == {"prompt_too_long": 1}
    assert "row-002" not in {r.id for r in module.datasets["train"]}


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["over-the-limit", "pil-refuses"])
def test_a_decompression_bomb_png_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    path = _with_image(tmp_path, "images/bomb.png", png_header(side, side))
    with pytest.raises(BadRecordError, match=r"record 2 .*(too many pixels|decompression)") as err:
        _setup(path, tmp_path)
    assert err.value.kind == "oversized_image"
    assert _setup(path, tmp_path, on_bad_record="skip").bad_record_counts == {"oversized_image": 1}


def test_a_zero_byte_image_is_named_empty(tmp_path: Path) -> None:
    path = _with_image(tmp_path, "images/zero.png", b"")
    with pytest.raises(BadRecordError, match=r"record 2 .*zero\.png': empty \(0 bytes\)") as err:
        _setup(path, tmp_path)
    assert err.value.kind == "corrupt_image"


def test_a_file_that_is_no_image_shows_its_first_bytes(tmp_path: Path) -> None:
    path = _with_image(tmp_path, "images/text.png", b"hello, I am text")
    with pytest.raises(BadRecordError, match=r"no image format it reads .*b'hello, I am '"):
        _setup(path, tmp_path)


def test_a_truncated_jpeg_is_named_truncated(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), "red").save(buffer, format="JPEG")
    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = _with_image(tmp_path, "images/cut.jpg", half)
    with pytest.raises(BadRecordError, match=r"record 2 .*cut\.jpg' .*truncated") as err:
        _setup(path, tmp_path)
    assert err.value.kind == "corrupt_image"


def test_an_image_path_that_leaves_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (tmp_path / "secret.png").write_bytes(png_header(8, 8))  # exists, outside data/
    path = _with_image(data, "../secret.png")
    with pytest.raises(BadRecordError, match=r"leads out of the data folder") as err:
        _setup(path, data)
    assert err.value.kind == "unreadable_image"


def test_an_image_path_to_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = _with_image(tmp_path, "/dev/zero")  # reading it would never end
    with pytest.raises(BadRecordError, match=r"'/dev/zero', which is not a regular file"):
        _setup(path, tmp_path)


# -- benchmarks and the judge's key -----------------------------------------------------------


def test_a_benchmark_csv_missing_a_column_names_it_and_the_published_header(tmp_path):
    root = write_figstep(tmp_path / "figstep")
    path = root / "data" / "question" / "safebench.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != "question"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "question"} for r in rows)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['question'\].*published header"):
        load_benchmark("figstep", root)


@pytest.mark.slow
def test_the_http_judges_key_is_in_no_log_cache_report_or_response(tiny_qwen25vl_path, tmp_path):
    key = "sk-test-7f3a9c1e-never-written"
    config = {
        "benchmarks": {"mossbench": str(write_mossbench(tmp_path / "moss"))},
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(tiny_qwen25vl_path), "guide": None},
        "generation": {"batch_size": 8, "max_new_tokens": 4, "device": "cpu"},
    }
    cache = tmp_path / "cache"
    env = {**os.environ, "JUDGE_KEY": key, "SAFEGRPO_CACHE": str(cache)}
    with FakeJudge() as server:
        config["judge"] = {
            "kind": "http",
            "http": {"base_url": server.base_url, "model": "fake", "api_key_env": "JUDGE_KEY"},
            "truncated": "judge",  # 4-token answers are cut: judge them, so the key is sent
        }
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "safegrpo_pl", "evaluate", "--config"]
        result = subprocess.run(
            [*command, str(tmp_path / "eval.yaml")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(server.auth) == {f"Bearer {key}"}, "the key must reach the judge"
    assert key not in result.stdout + result.stderr, "the key is in the console output"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "responses.jsonl" for p in written)
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
