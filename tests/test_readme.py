"""The README's examples, exactly as written: the data forms load, the TensorBoard snippet logs,
every command line parses (those that run in seconds also run), and every output it shows is
what its command prints."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_fixtures import png_bytes

from safegrpo_pl.data.datamodule import SafeTagDataModule

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def example(name: str) -> str:
    """The fenced block right after `<!-- example: NAME -->` in the README."""
    found = re.search(rf"<!-- example: {name} -->\n```[a-z]*\n(.*?)```", README, re.DOTALL)
    assert found, f"README has no example {name!r}"
    return found.group(1)


def _images(folder: Path, count: int = 6) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / "images" / f"{i}.png").write_bytes(png_bytes("red" if i % 2 else "blue"))


def _load(dataset: Path, tmp_path: Path) -> SafeTagDataModule:
    dm = SafeTagDataModule(str(dataset), batch_size=4, cache_dir=str(tmp_path / "hf"))
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("name", "file"), [("jsonl", "data.jsonl"), ("csv", "data.csv")])
def test_the_readme_file_examples_load_with_relative_image_paths(tmp_path, name, file):
    folder = tmp_path / "mydata"
    _images(folder)
    (folder / file).write_text(example(name))
    dm = _load(folder / file, tmp_path)
    records = [r for role in ("train", "test") for r in dm.datasets[role]]
    assert sorted(r.id for r in records) == [f"r{i}" for i in range(6)]
    assert len(dm.datasets["train"]) == 5, "one of six records held out for test"
    r3 = next(r for r in records if r.id == "r3")
    assert (r3.image_tag, r3.text_tag, r3.combine_tag) == ("safe", "unsafe", "unsafe")
    assert r3.image is not None and r3.image.getpixel((0, 0)) == (255, 0, 0)


def test_the_readme_parquet_and_save_to_disk_examples_load(tmp_path):
    folder = tmp_path / "mydata"
    _images(folder)
    (folder / "data.jsonl").write_text(example("jsonl"))
    code = example("datasets")
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, timeout=300)
    from_parquet = _load(folder / "data.parquet", tmp_path)
    assert len(from_parquet.datasets["train"]) + len(from_parquet.datasets["test"]) == 6
    from_disk = _load(folder / "safetag_disk", tmp_path)
    assert (len(from_disk.datasets["train"]), len(from_disk.datasets["test"])) == (4, 2)
    image = from_disk.datasets["train"][0].image
    assert image is not None and image.size == (32, 32)


def test_the_readme_tensorboard_snippet_builds_both_loggers_in_the_run_folder(tmp_path):
    pytest.importorskip("tensorboardX")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
    from safegrpo_pl.train.module import SafeGRPOModule

    snippet = tmp_path / "tensorboard.yaml"
    snippet.write_text(example("tensorboard").replace("runs/tiny", str(tmp_path / "run")))
    assert yaml.safe_load(snippet.read_text())["trainer"]["logger"][1]["class_path"].endswith(
        "TensorBoardLogger"
    )
    cli = SafeGRPOCLI(
        SafeGRPOModule,
        SafeTagDataModule,
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(snippet)],
    )
    csv_logger, tb_logger = cli.trainer.loggers
    assert isinstance(csv_logger, CSVLogger) and isinstance(tb_logger, TensorBoardLogger)
    tb_logger.log_metrics({"train/reward": 0.5}, step=1)
    tb_logger.finalize("success")
    assert list((tmp_path / "run" / "logs").glob("version_0/events.out.tfevents.*"))


def _readme_commands() -> list[str]:
    """Every `.venv/bin/python ...` line in the README's bash blocks, without comments."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        block = block.replace("\\\n", " ")  # a command continued on the next line
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(".venv/bin/python -m safegrpo_pl"):
                commands.append(line)
    return commands


def _run(args: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SAFEGRPO_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_every_readme_command_line_parses(tmp_path, monkeypatch, capsys):
    """Each command with `--print_config` appended: its configs, keys and values are valid
    (running them takes minutes to hours; the CPU ones are run in the tests below). In this
    process, through the entry point `python -m safegrpo_pl` calls (a process per command
    would spend minutes importing torch)."""
    from safegrpo_pl.cli import main

    commands = _readme_commands()
    assert len(commands) >= 10, commands
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SAFEGRPO_CACHE", str(tmp_path / "cache"))
    for command in commands:
        args = shlex.split(command)[3:]  # drop .venv/bin/python -m safegrpo_pl
        if "--print_config" not in args:
            args.append("--print_config")
        with pytest.raises(SystemExit) as exited:
            main(args)
        printed = capsys.readouterr()
        assert exited.value.code in (0, None), f"{command}\n{printed.err[-2000:]}"
        assert printed.out.strip(), f"{command}: --print_config printed nothing"


def _output_blocks() -> list[tuple[str, str]]:
    """(command, what it prints) of every ```text block that opens with `$ python -m
    safegrpo_pl`: the README's shown output."""
    blocks = []
    for block in re.findall(r"```text\n(\$ python -m safegrpo_pl .*?)```", README, re.DOTALL):
        command, _, output = block.partition("\n")
        blocks.append((command.removeprefix("$ "), output.rstrip("\n")))
    return blocks


def test_the_readme_shows_output_blocks() -> None:
    assert len(_output_blocks()) >= 3, "the plan examples and the mistyped option"


@pytest.mark.parametrize(("command", "shown"), _output_blocks())
def test_every_output_block_is_what_its_command_prints(command, shown, run_main):
    """The README cannot drift from the tools: each shown output is printed again, and must be
    the same text."""
    _, out, err = run_main(*shlex.split(command)[3:])  # drop python -m safegrpo_pl
    assert (out + err).strip() == shown, (
        f"README shows for `{command}`:\n{shown}\n\nbut it prints:\n{out}{err}"
    )


@pytest.mark.slow
def test_the_readme_own_data_command_runs_on_cpu(tmp_path):
    """The own-data command as written, shortened to one GRPO step and one warm-up step."""
    (command,) = [c for c in _readme_commands() if "--data.dataset data.jsonl" in c]
    _images(tmp_path)
    (tmp_path / "data.jsonl").write_text(example("jsonl"))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    args = shlex.split(command)[1:]
    args += ["--trainer.max_steps", "1", "--model.warmup.steps", "1", "--model.group_size", "2"]
    args += ["--model.sampling.max_new_tokens", "4", "--trainer.default_root_dir", "run"]
    result = _run(args, tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "logs" / "version_0" / "summary.json").is_file()


def test_the_typographic_script_help_shows_its_defaults(tmp_path):
    result = _run([str(ROOT / "scripts" / "make_typographic.py"), "--help"], ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(default: 448)" in result.stdout and "(default: typographic)" in result.stdout
    assert "text_tag` = safe" in result.stdout
