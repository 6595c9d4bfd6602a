"""A quiet console: known dependency notes hidden (ours kept), the cache keyword of the pinned
and of newer transformers, and our options first in `--help`."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from safegrpo_pl.rollout.prefill import cache_kwargs
from safegrpo_pl.run.console import StepProgressBar, silence_known_notes


def test_known_dependency_notes_are_hidden_and_others_kept(caplog):
    silence_known_notes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_notes()  # `simplefilter` above reset the filters: install them again
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
            "TreeSpec) and treespec.is_leaf()` instead.",
            stacklevel=1,
        )
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore ...", stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("model.group_size is odd", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["model.group_size is odd"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing ..."
        )
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: no module"
        )
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert caplog.messages == ["GPU available: False"]


class _PinnedBody:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):  # transformers 5.23
        return None


class _NewerBody:
    def forward(self, input_ids=None, cache=None, use_cache=None):  # transformers 5.24+
        return None


def test_the_kv_cache_goes_by_the_keyword_the_installed_transformers_takes():
    cache = object()
    assert cache_kwargs(_PinnedBody(), cache) == {"past_key_values": cache}
    assert cache_kwargs(_NewerBody(), cache) == {"cache": cache}


def test_fit_help_shows_our_options_first_and_no_unexplained_words(run_main):
    _, text, _ = run_main("fit", "--help")
    first_trainer = text.index("  --trainer.accelerator")
    assert text.index("  --model.policy.name_or_path") < first_trainer
    assert text.index("  --data.dataset") < first_trainer
    assert "SPEC" not in text and "FACTS" not in text
    assert "--optimizer" not in text and "--lr_scheduler" not in text


def test_the_step_bar_runs_once_across_epochs(tmp_path):
    # The demo's 2048 records are 64 rollouts an epoch: a bar restarted at each epoch showed a
    # clock back at 0 and a negative rate six times in a fit.
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    starts: list[tuple[int, float, int]] = []

    class Recording(StepProgressBar):
        def on_train_epoch_start(self, trainer, *args):
            super().on_train_epoch_start(trainer, *args)
            bar = self.train_progress_bar
            starts.append((id(bar), bar.start_t, bar.total))

    bar = Recording()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=10,
        limit_train_batches=4,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    assert len(starts) == 3, "10 steps of 4 batches an epoch start 3 epochs"
    assert len(set(starts)) == 1, f"the bar was restarted: {starts}"
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (10, 10)
    assert bar.train_progress_bar.desc.startswith("GRPO steps")


def test_the_step_bar_counts_steps_after_a_resume_in_the_middle_of_an_epoch(tmp_path):
    # Checkpoints every N steps fall mid-epoch, and Lightning skips the epoch's start on such a
    # resume: the bar must be set up when training starts, not only when an epoch does.
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen: list[tuple[int, int, str]] = []

    class Recording(StepProgressBar):
        def on_train_batch_end(self, trainer, pl_module, *args):
            super().on_train_batch_end(trainer, pl_module, *args)
            bar = self.train_progress_bar
            seen.append((bar.n, bar.total, bar.desc))

    def trainer(max_steps: int, *callbacks: Any) -> Trainer:
        return Trainer(
            default_root_dir=tmp_path,
            max_steps=max_steps,
            limit_train_batches=4,
            limit_val_batches=0,
            callbacks=[Recording(), *callbacks],
            logger=False,
            enable_model_summary=False,
        )

    # saved during training, after step 6 of 8: two batches into the second epoch
    every_6 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    trainer(8, every_6).fit(BoringModel())
    saved = sorted(tmp_path.glob("*step=6*.ckpt"))
    assert saved, list(tmp_path.iterdir())
    seen.clear()
    trainer(10).fit(BoringModel(), ckpt_path=saved[0])
    assert seen[0][:2] == (7, 10), f"the resumed bar does not count steps: {seen[0]}"
    assert all(desc.startswith("GRPO steps") for _, _, desc in seen), seen


def test_package_logs_go_to_stderr_as_it_is_when_they_are_written(monkeypatch):
    # A command run twice in one process under two redirections: the second run's messages
    # must reach the second stream, not the first (closed) one.
    import io
    import sys

    from safegrpo_pl.run.console import show_package_logs

    show_package_logs()
    for _ in range(2):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        logging.getLogger("safegrpo_pl.data").info("records loaded")
        assert stream.getvalue() == "records loaded\n"
