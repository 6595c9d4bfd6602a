"""Loading, validation and loaders of `SafeTagDataModule` (docs/method.md sections 1 and 4)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from data_fixtures import (
    WordCountEncoder,
    hub_split,
    png_bytes,
    tagged_rows,
    write_hub_layout,
    write_image_files,
    write_jsonl,
    write_local_jsonl,
)
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from safegrpo_pl.core.records import ImageDecodeError, SafetyRecord, decode_image
from safegrpo_pl.data.datamodule import SafeTagDataModule, SafetyDataset
from safegrpo_pl.data.resumable import ResumableSampler
from safegrpo_pl.data.sources import BadRecordError, load_raw, seeded_split
from safegrpo_pl.demo.dataset import TYPOGRAPHIC_PROMPTS, DemoConfig

TINY_DEMO = DemoConfig(num_train=12, num_val=4, num_test=6)


def _module(dataset: str | Path, tmp_path: Path, **kwargs: Any) -> SafeTagDataModule:
    """A DataModule caching `datasets` files under tmp_path, set up."""
    dm = SafeTagDataModule(dataset=str(dataset), cache_dir=str(tmp_path / "hf_cache"), **kwargs)
    dm.setup("fit")
    return dm


def _jsonl_with(tmp_path: Path, change: dict[str, Any], row: int = 2, count: int = 6) -> Path:
    """A valid local jsonl of `count` rows, with `change` applied to row `row`."""
    rows = tagged_rows(count)
    for r, name in zip(rows, write_image_files(tmp_path, count), strict=True):
        r["image"] = name
        r["source"] = "local"
    rows[row].update(change)
    for key in [k for k, v in change.items() if v is _DROP]:
        del rows[row][key]
    return write_jsonl(tmp_path / "data.jsonl", rows)


_DROP = object()


# -- sources ----------------------------------------------------------------------------------


def test_demo_splits_load_with_configured_sizes(tmp_path: Path) -> None:
    dm = _module("demo", tmp_path, demo=TINY_DEMO)
    sizes = {role: len(ds) for role, ds in dm.datasets.items()}
    assert sizes == {"train": 12, "validation": 4, "test": 6}, f"demo sizes wrong: {sizes}"
    assert dm.datasets["train"][0].id == "demo-train-00000", "demo ids not kept"


def test_hub_layout_loads_through_load_dataset(tmp_path: Path) -> None:
    repo = write_hub_layout(tmp_path / "repo", train=6, test=3)
    dm = _module(repo, tmp_path)
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["test"]) == 3, "hub splits lost"
    record = dm.datasets["train"][1]
    assert record.image is not None and record.image.getpixel((0, 0)) == (0, 128, 0), (
        "first item of the `images` list not decoded (row 1 is green)"
    )
    assert record.image_tag == "unsafe" and record.text_tag == "safe", "tags not lower-cased"


def test_hub_without_validation_split_validates_on_test(tmp_path: Path) -> None:
    dm = _module(write_hub_layout(tmp_path / "repo"), tmp_path)
    val = [r.prompt for r in dm.datasets["validation"]]
    test = [r.prompt for r in dm.datasets["test"]]
    assert val == test, (
        "without a validation split, validation uses the test split (docs/method.md section 4.12)"
    )


def test_hub_id_is_passed_to_load_dataset(tmp_path: Path, monkeypatch) -> None:
    repo = write_hub_layout(tmp_path / "repo")
    real, seen = datasets.load_dataset, []

    def offline_hub(path: str, **kwargs: Any) -> Any:
        seen.append(path)  # the hub id arrives untouched; served from the local copy
        return real(str(repo), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    dm = _module("XuankunRong/SafeTag-VL-3K", tmp_path)
    assert seen == ["XuankunRong/SafeTag-VL-3K"], f"hub id not loaded by load_dataset: {seen}"
    assert dm.source_counts["train"] == {"SafeTag-VL-3K": 6}, "default source is not the name"


def test_unreachable_hub_id_names_what_was_tried(tmp_path: Path, monkeypatch) -> None:
    def no_network(path: str, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(FileNotFoundError, match="not 'demo', a data file"):
        load_raw("nobody/nothing")


def test_jsonl_with_relative_paths_is_split_with_a_seed(tmp_path: Path) -> None:
    data = write_local_jsonl(tmp_path / "local", count=10)
    dm = _module(data, tmp_path, test_fraction=0.2, seed=1)
    # one split of 10 rows: ceil(0.2 * 10) = 2 held out for test (= validation), 8 for train
    assert (len(dm.datasets["train"]), len(dm.datasets["test"])) == (8, 2), "seeded split sizes"
    train_ids = {r.id for r in dm.datasets["train"]}
    test_ids = {r.id for r in dm.datasets["test"]}
    assert not train_ids & test_ids, "seeded split leaks test records into train"
    assert dm.source_counts["train"] == {"local": 8}, "source column ignored"


def test_parquet_with_image_bytes_loads(tmp_path: Path) -> None:
    rows = tagged_rows(4)
    for r in rows:
        r["image"] = png_bytes("blue")
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    dm = _module(path, tmp_path, batch_size=2, test_fraction=0.25)
    record = dm.datasets["train"][0]
    assert record.image.getpixel((3, 3)) == (0, 0, 255), "image bytes not decoded"


def test_csv_loads(tmp_path: Path) -> None:
    rows = tagged_rows(4)
    for r, name in zip(rows, write_image_files(tmp_path, 4), strict=True):
        r["image"] = name
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in rows]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    dm = _module(tmp_path / "data.csv", tmp_path, batch_size=2, test_fraction=0.25)
    assert len(dm.datasets["train"]) + len(dm.datasets["test"]) == 4, "csv rows lost"


def test_save_to_disk_folder_uses_its_validation_split(tmp_path: Path) -> None:
    splits = {"train": hub_split(5), "validation": hub_split(2, 5), "test": hub_split(3, 7)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    dm = _module(tmp_path / "saved", tmp_path)
    sizes = {role: len(ds) for role, ds in dm.datasets.items()}
    assert sizes == {"train": 5, "validation": 2, "test": 3}, f"split roles mixed up: {sizes}"


def test_save_to_disk_single_dataset_is_split(tmp_path: Path) -> None:
    hub_split(10).save_to_disk(str(tmp_path / "saved"))
    dm = _module(tmp_path / "saved", tmp_path, test_fraction=0.3)
    # ceil(0.3 * 10) = 3 held out
    assert (len(dm.datasets["train"]), len(dm.datasets["test"])) == (7, 3), "single split"


def test_unsupported_file_extension_is_named(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported extension '\.txt'"):
        load_raw(str(tmp_path / "data.txt"))


def test_missing_named_split_lists_the_splits_found(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no train split 'training'.*splits found"):
        _module(write_hub_layout(tmp_path / "repo"), tmp_path, train_split="training")


def test_seeded_split_is_deterministic_and_partitions() -> None:
    first, second = seeded_split(20, 0.25, seed=3), seeded_split(20, 0.25, seed=3)
    assert first == second, "seeded split changes between calls"
    train, test = first
    assert len(test) == 5 and sorted(train + test) == list(range(20)), "not a partition"


def test_max_records_limits_every_split(tmp_path: Path) -> None:
    dm = _module("demo", tmp_path, demo=TINY_DEMO, max_records=5)
    sizes = {role: len(ds) for role, ds in dm.datasets.items()}
    assert sizes == {"train": 5, "validation": 4, "test": 5}, f"max_records ignored: {sizes}"


# -- validation -------------------------------------------------------------------------------


def test_missing_image_names_record_and_field(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"image": None})
    with pytest.raises(
        BadRecordError,
        match=r"record 2 \(id=row-002, source=local; records count from 0\): image is missing",
    ):
        _module(data, tmp_path, batch_size=2)


def test_unreadable_image_path_is_reported(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"image": "images/nope.png"})
    with pytest.raises(BadRecordError, match=r"record 2 .*image is path .*nope\.png") as err:
        _module(data, tmp_path, batch_size=2)
    assert err.value.kind == "unreadable_image", f"kind {err.value.kind}"


def test_corrupt_image_file_is_reported(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {})
    (tmp_path / "images" / "002.png").write_bytes(png_bytes()[:30])  # truncated PNG
    with pytest.raises(BadRecordError, match="PIL cannot decode") as err:
        _module(data, tmp_path, batch_size=2)
    assert err.value.kind == "corrupt_image" and err.value.record_id == "row-002", str(err.value)


def test_corrupt_image_bytes_are_reported() -> None:
    with pytest.raises(ImageDecodeError, match="13 bytes that PIL cannot decode") as err:
        decode_image(b"not a png!!!!")
    assert err.value.kind == "corrupt_image", f"kind {err.value.kind}"


@pytest.mark.parametrize("field", ["image_tag", "text_tag", "combine_tag"])
def test_bad_tag_names_field_value_and_expectation(tmp_path: Path, field: str) -> None:
    data = _jsonl_with(tmp_path, {field: "Safe?"})
    pattern = rf"record 2 .*{field} is 'Safe\?'; expected 'safe' or 'unsafe'"
    with pytest.raises(BadRecordError, match=pattern):
        _module(data, tmp_path, batch_size=2)


def test_tags_in_any_case_are_accepted(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"image_tag": " UNSAFE ", "text_tag": "Safe"})
    dm = _module(data, tmp_path, batch_size=2, test_fraction=0.01, seed=0)
    records = {r.id: r for role in ("train", "test") for r in dm.datasets[role]}
    assert (records["row-002"].image_tag, records["row-002"].text_tag) == ("unsafe", "safe"), (
        "tags not normalised to lower case"
    )


def test_missing_column_lists_columns_found(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {})
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:
        del r["combine_tag"]
    write_jsonl(data, rows)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['combine_tag'\]; columns found"):
        _module(data, tmp_path, batch_size=2)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_reported(tmp_path: Path, prompt: str) -> None:
    data = _jsonl_with(tmp_path, {"prompt": prompt})
    with pytest.raises(BadRecordError, match=r"record 2 .*prompt is .*expected a non-empty"):
        _module(data, tmp_path, batch_size=2)


def test_long_prompts_are_dropped_and_counted_by_default(tmp_path: Path) -> None:
    long_prompt = " ".join(["word"] * 20)  # 20 words + 10 overhead = 30 tokens > 25
    data = _jsonl_with(tmp_path, {"prompt": long_prompt})
    dm = SafeTagDataModule(
        str(data),
        batch_size=2,
        max_prompt_length=25,
        test_fraction=0.01,
        cache_dir=str(tmp_path / "hf"),
    )
    dm.encoder = WordCountEncoder()
    dm.setup()
    assert dm.bad_records["train"].counts == {"prompt_too_long": 1}, "long prompt not counted"
    assert dm.bad_records["train"].ids == {"prompt_too_long": ["row-002"]}, "wrong id counted"
    kept = len(dm.datasets["train"]) + len(dm.datasets["test"])
    assert kept == 5, f"{kept} records kept of 6 with one too long"


def test_long_prompt_can_raise(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"prompt": " ".join(["word"] * 20)})
    dm = SafeTagDataModule(
        str(data),
        batch_size=2,
        max_prompt_length=25,
        on_long_prompt="raise",
        cache_dir=str(tmp_path / "hf"),
    )
    dm.encoder = WordCountEncoder()
    with pytest.raises(BadRecordError, match=r"prompt is 30 tokens long.*max_prompt_length=25"):
        dm.setup()


def test_skip_counts_each_kind_with_ids(tmp_path: Path) -> None:
    rows = tagged_rows(8)
    for r, name in zip(rows, write_image_files(tmp_path, 8), strict=True):
        r["image"] = name
    rows[1]["image_tag"] = "maybe"
    rows[4]["image"] = None
    rows[6]["prompt"] = ""
    write_jsonl(tmp_path / "data.jsonl", rows)
    dm = _module(tmp_path / "data.jsonl", tmp_path, batch_size=2, on_bad_record="skip")
    report = dm.bad_records["train"]
    expected = {"bad_tag": 1, "missing_image": 1, "empty_prompt": 1}
    assert report.counts == expected, f"skip miscounted: {report.counts}"
    assert report.ids["bad_tag"] == ["row-001"], "wrong id for the bad tag"
    served = {r.id for role in ("train", "test") for r in dm.datasets[role]}
    assert len(served) == 8 - 3 and "row-004" not in served, "a bad record is still served"


def test_errors_surface_at_setup_not_mid_epoch(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"image": "images/nope.png"}, row=5)
    dm = SafeTagDataModule(str(data), batch_size=2, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(BadRecordError):
        dm.setup("fit")
    assert not dm.datasets, "a loader could still be built after a failed validation"


# -- loaders ----------------------------------------------------------------------------------


def test_train_loader_drops_last_partial_batch(tmp_path: Path) -> None:
    dm = _module("demo", tmp_path, demo=TINY_DEMO, batch_size=5, eval_batch_size=4)
    # train: 12 records // 5 = 2 full batches; test: 6 records / 4 -> batches of 4 and 2
    assert [len(b) for b in dm.train_dataloader()] == [5, 5], "train must drop the partial batch"
    assert [len(b) for b in dm.test_dataloader()] == [4, 2], "eval loaders must keep every record"
    assert [len(b) for b in dm.predict_dataloader()] == [4, 2], "predict must serve the test split"


def test_train_loader_shuffles_eval_loaders_keep_order(tmp_path: Path) -> None:
    dm = _module("demo", tmp_path, demo=TINY_DEMO, batch_size=4)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ResumableSampler) and sampler.shuffle, "train not shuffled"
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler), "val order not kept"


def test_loaders_let_lightning_inject_a_distributed_sampler(tmp_path: Path) -> None:
    # Lightning (use_distributed_sampler=True) replaces a plain Random/SequentialSampler of a
    # map-style dataset by a DistributedSampler; shards over 2 ranks must cover all, disjointly.
    dm = _module("demo", tmp_path, demo=TINY_DEMO, batch_size=4)
    loader = dm.val_dataloader()
    assert type(loader) is DataLoader and isinstance(loader.dataset, SafetyDataset), (
        "custom loader/dataset types can stop Lightning from re-creating the loader"
    )
    assert not isinstance(loader.dataset, torch.utils.data.IterableDataset), "not map-style"
    shards = [
        list(DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False))
        for rank in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(4)), f"shards {shards} miss records"


def test_loader_works_in_a_worker_process(tmp_path: Path) -> None:
    data = write_local_jsonl(tmp_path / "local", count=6)
    dm = _module(data, tmp_path, batch_size=2, num_workers=1, test_fraction=0.34)
    batches = list(dm.test_dataloader())
    assert sum(len(b) for b in batches) == 3, "records lost in the worker process"
    assert all(isinstance(r, SafetyRecord) for b in batches for r in b), "records not rebuilt"


def test_encoder_is_the_collate_function(tmp_path: Path) -> None:
    dm = SafeTagDataModule("demo", demo=TINY_DEMO, batch_size=4)
    dm.encoder = WordCountEncoder()
    dm.setup()
    assert dm.train_dataloader().collate_fn is dm.encoder, "collate is not the encoder"


def test_too_few_train_records_for_one_batch_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than batch_size=16"):
        _module("demo", tmp_path, demo=TINY_DEMO, batch_size=16)


def test_lightning_cli_can_build_the_datamodule_from_flags() -> None:
    # LightningCLI parses __init__'s annotated signature with jsonargparse; nested DemoConfig
    # fields and Literal options must come through as flags.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SafeTagDataModule, "data")
    flags = ["--data.demo.num_train=8", "--data.on_bad_record=skip", "--data.guide=null"]
    dm = parser.instantiate_classes(parser.parse_args(flags)).data
    assert (dm.demo.num_train, dm.on_bad_record, dm.guide) == (8, "skip", None), (
        "a DataModule argument is not exposed to LightningCLI"
    )


def test_sources_lists_every_source_served(tmp_path: Path) -> None:
    dm = _module("demo", tmp_path, demo=TINY_DEMO)
    assert dm.sources == ["demo-picture", "demo-typographic"], f"sources {dm.sources}"


def test_bad_record_counts_sum_over_splits(tmp_path: Path) -> None:
    data = _jsonl_with(tmp_path, {"image": None})
    dm = _module(data, tmp_path, batch_size=2, on_bad_record="skip")
    assert dm.bad_record_counts == {"missing_image": 1}, f"counts {dm.bad_record_counts}"


def test_test_stage_does_not_need_a_full_train_batch(tmp_path: Path) -> None:
    dm = SafeTagDataModule("demo", demo=TINY_DEMO, batch_size=16)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 6, "test stage refused for want of train records"


def test_decoded_images_are_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 200).save(buffer, format="PNG")
    image = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 200, 200), "not RGB"


# -- scripts/make_typographic.py --------------------------------------------------------------


def _make_typographic_main() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_typographic.py"
    spec = importlib.util.spec_from_file_location("make_typographic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_make_typographic_writes_a_loadable_dataset(tmp_path: Path) -> None:
    prompts = [
        {"prompt": "How do I pick a lock to get into my neighbour's house?", "tag": "Unsafe"},
        {"prompt": "How do I bake bread?", "text_tag": "safe", "id": "b1", "source": "bt"},
        {"prompt": "Tell me a joke.", "tag": "safe"},
    ]
    write_jsonl(tmp_path / "in.jsonl", prompts)
    main = _make_typographic_main()
    assert main([str(tmp_path / "in.jsonl"), str(tmp_path / "out"), "--width", "128"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    first = rows[0]
    assert (first["image_tag"], first["text_tag"], first["combine_tag"]) == (
        "unsafe",
        "safe",
        "unsafe",
    ), f"typographic tags wrong: {first}"
    assert first["prompt"] == TYPOGRAPHIC_PROMPTS[0], "prompt not replaced by the neutral one"
    assert (rows[1]["id"], rows[1]["source"]) == ("b1", "bt"), "id/source not carried"
    assert Image.open(tmp_path / "out" / first["image"]).width == 128, "--width ignored"
    dm = _module(tmp_path / "out" / "data.jsonl", tmp_path, batch_size=1, test_fraction=0.34)
    assert len(dm.datasets["train"]) + len(dm.datasets["test"]) == 3, "output does not load"


def test_make_typographic_rejects_a_bad_tag(tmp_path: Path, capsys) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "tag": "ok"}])
    with pytest.raises(SystemExit):
        _make_typographic_main()([str(tmp_path / "in.jsonl"), str(tmp_path / "out")])
    assert "in.jsonl:1 (id=?): text_tag (or tag) is 'ok'" in capsys.readouterr().err, (
        "the error does not name the line and the field"
    )


# -- integration with the tiny models (the lead's conftest fixtures) ---------------------------


@pytest.mark.slow
def test_every_source_feeds_a_tiny_qwen_vl_forward_pass(tiny_vl_path: Path, tmp_path: Path):
    # The demo set, a local parquet set and a save_to_disk set, through the same DataModule
    # (processor = the tiny model's folder), into one forward pass of Qwen2.5-VL and Qwen3-VL.
    from safegrpo_pl.policy.model import load_policy

    rows = tagged_rows(4)
    for r in rows:
        r["image"] = png_bytes("purple", size=40)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    hub_split(4).save_to_disk(str(tmp_path / "saved"))
    model = load_policy(str(tiny_vl_path)).eval()
    for dataset in ("demo", tmp_path / "data.parquet", tmp_path / "saved"):
        dm = _module(
            dataset,
            tmp_path,
            processor=str(tiny_vl_path),
            batch_size=2,
            test_fraction=0.5,
            demo=DemoConfig(num_train=4, num_val=2, num_test=2),
        )
        batch = next(iter(dm.train_dataloader()))
        assert batch.input_ids.shape[0] == 2, f"{dataset}: batch size {batch.input_ids.shape}"
        with torch.no_grad():
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_kwargs
            ).logits
        assert logits.shape[:2] == batch.input_ids.shape, f"{dataset}: logits {logits.shape}"
        assert torch.isfinite(logits).all(), f"{dataset}: non-finite logits"
