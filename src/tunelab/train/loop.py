"""The training loop: `train(cfg, out)` reads top to bottom, the same for every task.

Per optimizer step: a window of `grad_accum` length-grouped micro-batches; each micro-batch's summed
loss is divided by the number of loss terms in the whole window (examples for classification, target
tokens for language modelling and NER), so the accumulated gradient is the gradient of the mean loss
over the window whatever the batch sizes. Then clip, optimizer step, LR schedule step. Evaluation on
the validation split (the task's metric: macro-F1, entity F1, perplexity) every `eval_every` steps or
each epoch; the best weights are kept; early stopping after `early_stopping_patience` evaluations
without gain. What differs between tasks lives in `tunelab.tasks` (its `TaskSpec` registry).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shlex
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tunelab.artifacts import META_FILE, FolderLock, check_target, kind_of, recover, write_folder
from tunelab.config import RunConfig, dump_config, flatten, own_method_sections
from tunelab.data.dataset import load_meta, load_split
from tunelab.data.prepare import PrepareOptions, prepare
from tunelab.data.split import seeded_subset
from tunelab.errors import UserError
from tunelab.evaluate import base_fit, drift
from tunelab.evaluate.leakage import row_text
from tunelab.methods import MethodContext, apply_method, head_module_names
from tunelab.tasks import DATASET_TASKS, TaskSpec, task_spec, tasks_where
from tunelab.tasks.sft import stop_tokens
from tunelab.terminal import make_console, plain, print_warnings
from tunelab.models import (count_parameters, encoder_type, library_versions, load_trainable_state, parent_record,
                            save_model_dir, trainable_state)
from tunelab.train import checkpoint as ckpt
from tunelab.train import distributed
from tunelab.train.adversarial import Adversary
from tunelab.train.distill import distilled
from tunelab.train.batching import length_grouped_batches
from tunelab.train.optim import build_optimizer, build_schedule
from tunelab.train.precision import autocast, resolve_precision
from tunelab.train.progress import TrainProgress
from tunelab.train.regularize import build_anchor, old_data_dir, replay_rows
from tunelab.train.signals import StopRequest, StopRequested
from tunelab.train.tracking import NullTracker, Tracker


@dataclass
class LoopState:
    """Everything besides tensors needed to continue a run exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (its batch order is seeded by seed + epoch)
    window: int = 0  # accumulation windows done in the current epoch
    examples_seen: int = 0
    tokens_seen: int = 0  # real (non-padding) input tokens trained on
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    nonfinite_skipped: int = 0  # updates skipped for a non-finite loss or gradient (train.on_nonfinite: skip)
    done: bool = False  # the loop has ended (last step or early stopping); what is left is the final save


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_dataset(cfg: RunConfig, console: Console | None = None) -> tuple[Path, dict | None]:
    """The prepared dataset dir of the run, and what this call prepared: when `data.dir` does not exist yet it
    is prepared from `data.prepare`, announced before the work starts (a mistyped `data.dir` shows here)."""
    d = Path(cfg.data.dir)
    if (d / "dataset.json").is_file():
        return d, None
    if cfg.data.prepare is None:
        raise UserError(f"data.dir {d} is not a prepared dataset and data.prepare is not set; "
                        f"run `tunelab data prepare SOURCE --out {d}` first")
    p = cfg.data.prepare
    if console is not None:
        console.print(f"[bold]preparing[/] {plain(p.source)} into data.dir {plain(d)} (it holds no dataset yet; "
                      "options from data.prepare)")
    started = time.time()
    meta = prepare(p.source, d, PrepareOptions(**p.model_dump(exclude={"source"})))
    if console is not None:
        console.print("prepared " + " / ".join(f"{n:,} {name}" for name, n in meta["splits"].items()) + " rows")
        print_warnings(meta.get("warnings", []), console)
    return d, {"source": p.source, "dir": str(d.resolve()), "fingerprint": meta["fingerprint"],
               "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


METRIC_NAMES = {"macro_f1": "macro-F1", "entity_f1": "entity F1"}


def resolve_task(cfg: RunConfig, meta: dict, data_dir: Path) -> str:
    """The training task: `task: auto` takes the dataset kind's default task, another must train on that kind.
    A decoder's task on an encoder base (a text dataset and a BERT-family base: `auto` means causal_lm) is a
    `UserError` naming `task: masked_lm`: an encoder sees the token it should predict, so it would learn nothing.
    """
    kind = meta.get("task")
    default = DATASET_TASKS.get(kind)
    if default is None:
        raise UserError(f"{data_dir}: unknown dataset task '{kind}'")
    task = default if cfg.task == "auto" else cfg.task
    if task_spec(task).dataset != kind:
        raise UserError(f"{data_dir} holds a '{kind}' dataset, which trains task "
                        f"{' or '.join(tasks_where(dataset=kind))}; this config says task: {cfg.task}")
    if task_spec(task).generates and (encoder := encoder_type(cfg.model.base)):
        raise UserError(f"{cfg.model.base} is an encoder ({encoder}), not a decoder: task {task} would let it see "
                        f"the tokens it predicts; set task: masked_lm to continue its pretraining on {data_dir}, or "
                        "use a decoder base")
    return task


def accumulate_gradients(model, task, enc, window: list[list[int]], device: str, precision: str = "fp32",
                         split: int = 1, shard=None, keep_empty: bool = False, loss_scale: float = 1.0,
                         adversary=None) -> float:
    """Backward over the micro-batches of one optimizer step -> the window's mean loss.

    Each micro-batch contributes (sum of its loss terms) / (loss terms in the whole window), so the
    accumulated gradient equals that of the mean loss over the window, whatever the micro-batch sizes;
    `split` cuts every micro-batch into that many smaller ones (less memory, the same gradient).
    `shard(idx)` -> this process's share of a micro-batch under data parallelism (normalisation stays
    global, so summing the ranks' gradients gives the single-process gradient). `keep_empty`: a rank
    whose share is empty still runs the micro-batch's forward and backward, at zero weight (FSDP's
    collectives need every rank in every forward). `loss_scale` multiplies the backward pass only (FSDP
    averages gradients over ranks; scaling by the world size turns that into the sum). `adversary`
    (`train.adversarial`): each micro-batch adds the gradient of its loss under an embedding perturbation.
    """
    n = sum(task.units(enc, idx) for idx in window)
    weights = [1.0] * len(window)
    if shard is not None:
        parts = [(shard(idx), idx) for idx in window]
        window = [part or idx[:1] for part, idx in parts if part or keep_empty]
        weights = [1.0 if part else 0.0 for part, idx in parts if part or keep_empty]
    if split > 1:
        pieces = [(part.tolist(), w) for idx, w in zip(window, weights)
                  for part in np.array_split(np.asarray(idx), split) if len(part)]
        window, weights = [p for p, _ in pieces], [w for _, w in pieces]
    total = 0.0
    for idx, w in zip(window, weights):
        batch = {k: v.to(device) for k, v in task.collate(enc, idx).items()}

        def compute(batch=batch, w=w) -> torch.Tensor:
            with autocast(precision, device.split(":")[0]):
                return task.loss_sum(model, batch) * (w / max(1, n))

        if adversary is not None:
            loss = adversary.backward(model, compute, loss_scale)
        else:
            loss = compute()
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        total += loss.item()
    return total


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _oom_message(step: int, tc, cfg: RunConfig, split: int) -> str:
    per = f"micro-batches of ~{max(1, tc.batch_size // split)}" if split > 1 else f"batch_size {tc.batch_size}"
    return (f"out of memory at step {step} ({per}, model.max_length {cfg.model.max_length}); lower "
            "train.batch_size (raise train.grad_accum to keep the effective batch), lower model.max_length, set "
            "model.gradient_checkpointing: true, or let train.auto_batch_size: true split the batches; no "
            "checkpoint was written for this step")


@dataclass
class EvalPoint:
    """What an `on_eval` hook of `train` sees after each validation pass."""

    step: int  # optimizer steps done
    epochs: float  # epochs of training done (steps / steps per epoch)
    examples_seen: int
    score: float  # the task's metric now
    best: float  # the best so far (the model dir will hold the best weights)
    metrics: dict


def train(cfg: RunConfig, out: str | Path, resume: str | None = None, force: bool = False,
          overwrite: bool = False, console: Console | None = None, show_progress: bool = True,
          on_eval=None, checkpoints: bool = True) -> dict:
    """Fine-tune `cfg.model.base` on `cfg.data` and write the run dir `out` (see ARCHITECTURE.md).

    The run dir is locked for the whole run (one writer; a second gets an error naming this process). A run
    dir that already holds checkpoints or a model is continued with `resume`, or replaced with `overwrite`
    (only once the config, the data and the model have loaded: a fresh run dir is swapped in for the old
    one); a folder tunelab did not write is refused. A stop at any moment (SIGTERM/SIGINT, including
    during the final evaluation and save) leaves a valid model dir or a checkpoint of the last step.
    Returns a summary: best validation metrics, steps, examples/s and the model dir path.

    `on_eval(EvalPoint) -> bool` is called after every validation pass; True stops the run there without a
    model dir (a hyperparameter search pruning the trial; the summary says `pruned`). `checkpoints=False`
    writes none (a trial that is rerun rather than resumed); a stop then leaves nothing to continue from.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; choose one")
    # What tunelab may never write into is refused before the lock is taken (no lock file is left beside it);
    # whether an earlier run may be replaced is decided holding the lock, so a run in progress is named first.
    check_run_dir(out, resume, overwrite=True)
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes the run dir
    with FolderLock(out) if writer else nullcontext():
        return _train(cfg, out, resume, force, overwrite, console, show_progress, on_eval, checkpoints)


def _train(cfg: RunConfig, out: Path, resume: str | None, force: bool, overwrite: bool, console: Console | None,
           show_progress: bool, on_eval=None, checkpoints: bool = True) -> dict:
    """The run, holding the run dir's lock: set up, then one optimizer step per window of micro-batches, epoch
    after epoch, with evaluation, checkpoints and the stop checks after each; then the model dir."""
    run = _Run(cfg, out, resume, force, overwrite, console, show_progress)
    run.on_eval, run.checkpoints = on_eval, checkpoints
    try:
        with run.stop_req:
            while not run.stop and run.state.step < run.total_steps:
                windows = run.epoch_windows()
                for window in windows[run.state.window:]:
                    run.step(window, len(windows))
                    if run.stop or run.state.step >= run.total_steps:
                        break
                else:  # the epoch's windows are done: the next epoch reshuffles
                    run.state.epoch, run.state.window = run.state.epoch + 1, 0
            result = None if run.interrupted or run.pruned else run.finish()
    except BaseException:
        run.tracker.close("FAILED")  # the error goes on; the trackers record that the run failed
        raise
    return run.summary(result)


class _Run:
    """One training run's pieces and running totals; `_train` reads as the loop over them.

    Set up in the order determinism needs: data first (preparing it may build cached assets), then the seed,
    then the model, the method, the optimizer and a resumed checkpoint's state."""

    def __init__(self, cfg: RunConfig, out: Path, resume: str | None, force: bool, overwrite: bool,
                 console: Console | None, show_progress: bool):
        tc = self.tc = cfg.train
        self.cfg, self.out, self.resume = cfg, out, resume
        self.dd = dd = distributed.from_env(tc.dist_timeout_s, tc.distributed)  # one process unless torchrun
        self.console = console or make_console(stderr=True)
        if not dd.main:  # rank 0 speaks for the job
            self.console, show_progress = Console(file=io.StringIO()), False
        check_run_dir(out, resume, overwrite)  # again, holding the lock
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        self.device = f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(tc.precision, self.device.split(":")[0])
        prepared = self._load_data()
        # Seeded here, after the data was prepared and before the model is built: whatever ran before (building
        # a cached asset, preparing data) leaves the run's random draws alone, so a warm or cold cache trains
        # the same.
        seed_everything(tc.seed)
        self._build_model()
        self.state, self.best_weights = LoopState(), None
        self.run_record = {"config": cfg.model_dump(mode="json"), "data_fingerprint": self.meta["fingerprint"]}
        if resume:
            self.state, self.best_weights = _resume(out, resume, force, self.run_record, self.model, self.optimizer,
                                                    self.scheduler, self.console, dd.fsdp)
        self._open(prepared)
        self.progress = TrainProgress(self.total_steps, self.state.step, enabled=show_progress,
                                      console=self.console, unit="tok/s" if self.spec.generates else "ex/s")
        self.stop_req = StopRequest(lambda name: self.progress.note(
            f"{name}: finishing this step, then a checkpoint (a second Ctrl-C stops at once)"))
        self.t_start, self.eval_time = time.perf_counter(), 0.0
        self.seen_at_start, self.tokens_at_start = self.state.examples_seen, self.state.tokens_seen
        self.window_loss, self.window_count, self.last_eval = 0.0, 0, None
        self.split, self.nonfinite_in_row = 1, 0  # micro-batch split after out-of-memory; skipped steps in a row
        self.stop, self.interrupted, self.pruned = self.state.done, False, False
        self.on_eval, self.checkpoints = None, True
        self.saved_step = self.state.step if resume else None

    def _load_data(self) -> dict | None:
        """The dataset (prepared by rank 0 if it does not exist yet) and the run's train/validation rows;
        -> what was prepared, for the run's record."""
        cfg, dd = self.cfg, self.dd
        prepared = ensure_dataset(cfg, self.console)[1] if dd.main else None
        dd.barrier()
        self.data_dir = data_dir = ensure_dataset(cfg)[0]
        self.meta = load_meta(data_dir)
        self.spec = task_spec(resolve_task(cfg, self.meta, data_dir))
        subset = dict(seed=cfg.train.seed, stratify=self.spec.stratify)
        self.train_rows = seeded_subset(load_split(data_dir, "train"), cfg.data.max_train_examples, **subset)
        self.val_rows = seeded_subset(load_split(data_dir, "validation"), cfg.data.max_eval_examples, **subset)
        if not self.train_rows or not self.val_rows:
            raise UserError(f"{data_dir}: the train and validation splits must both have rows")
        self.replay = None
        if cfg.data.replay:  # old rows mixed in (an update); validation stays the new data's
            old, self.replay = replay_rows(cfg, self.meta["task"], len(self.train_rows), self.spec.stratify)
            self.train_rows = self.train_rows + old
        return prepared

    def _build_model(self) -> None:
        """The task's model with the method applied, on its device (sharded under FSDP), its optimizer and
        learning-rate schedule."""
        cfg, tc, dd = self.cfg, self.tc, self.dd
        model, self.tokenizer, self.base, new_params, task = self.spec.build()(cfg, self.meta, self.train_rows)
        heads = tuple(head_module_names(model, new_params))
        self.tr, self.va = task.encode(self.train_rows), task.encode(self.val_rows)
        self.lengths = self.tr.lengths  # a property that builds the list: read it once, not per step
        self.windows_per_epoch = windows_per_epoch = math.ceil(math.ceil(len(self.tr) / tc.batch_size) / tc.grad_accum)
        self.total_steps = tc.max_steps or math.ceil(tc.epochs * windows_per_epoch)
        model = apply_method(model, cfg.method, MethodContext(
            self.spec, new_params, self.total_steps, None if self.base.ref == "scratch" else str(self.base.path)))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = model.to(self.device)
        if dd.fsdp:
            model = distributed.shard_model(model)
            task.through_model_forward()  # FSDP gathers root weights in the model's forward only
        base_task = task
        self.adversary = self._remedies(task)
        if tc.distill:
            task = distilled(task, self.spec, tc.distill, self.tokenizer, self.device)
        self.model, self.task = model, task
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, heads, kind=tc.optimizer,
                                         fused=not dd.fsdp)
        self.scheduler = build_schedule(self.optimizer, tc.schedule, self.total_steps,
                                        round(tc.warmup_ratio * self.total_steps))
        self.better = (lambda a, b: a > b) if task.greater_is_better else (lambda a, b: a < b)
        self.anchor, self.penalty = None, 0.0
        if tc.regularize:  # built on the starting weights, before a resumed run loads its checkpoint
            if dd.fsdp:
                raise UserError("train.regularize works without FSDP (ddp or one process)")
            self.anchor = build_anchor(tc.regularize, model, new_params, lambda: self._fisher_data(base_task))

    def _remedies(self, task) -> Adversary | None:
        """`train.label_smoothing` set on the task (labelled tasks only) -> the `train.adversarial` adversary."""
        tc = self.tc
        if tc.label_smoothing:
            if not self.spec.labelled:
                raise UserError(f"train.label_smoothing smooths class targets; task {self.spec.name} has none "
                                "(classification and token_classification do)")
            task.label_smoothing = tc.label_smoothing
        if tc.adversarial is None:
            return None
        if self.dd.fsdp:
            raise UserError("train.adversarial works without FSDP (ddp or one process)")
        return Adversary(tc.adversarial)

    def _fisher_data(self, task):
        """EWC's rows: `train.regularize.fisher_rows` of the old train split, encoded by the run's own task."""
        rc = self.cfg.train.regularize
        d = old_data_dir(self.cfg, rc.dir, "train.regularize", self.meta["task"])
        rows = seeded_subset(load_split(d, "train"), rc.fisher_rows, seed=self.tc.seed, stratify=self.spec.stratify)
        return task, task.encode(rows), self.device

    def _open(self, prepared: dict | None) -> None:
        """The run dir and its tracker; the base-fit check and the one line that says what will run."""
        cfg, spec, dd, console = self.cfg, self.spec, self.dd, self.console
        if dd.main:
            _open_run_dir(self.out, cfg, fresh=not self.resume, info={
                "name": cfg.name, "task": spec.name, "base": cfg.model.base,
                "data": {"dir": str(Path(self.data_dir).resolve()), "fingerprint": self.meta["fingerprint"],
                         **({"prepared_by_this_run": prepared} if prepared else {})}})
        self.tracker = self._tracker() if dd.main else NullTracker()
        if self.resume:  # the record says where the run continued from, and what --force let through
            self.tracker.log(self.state.step, **self.run_record.get("resumed_from", {}))
        self.fit = base_fit.measure(self.tokenizer, [row_text(r) for r in self.train_rows])
        if (warning := base_fit.advice(self.fit, cfg.model.base)) is not None:  # before an hour is spent on it
            print_warnings([warning], console)
        n_train, n_total = count_parameters(self.model)
        packed = (f" in {len(self.tr):,} + {len(self.va):,} packed blocks" if self.task.packing
                  else "")
        console.print(f"[bold]train[/] {spec.name} · {plain(cfg.model.base)} · method {cfg.method.name} · "
                      f"trainable {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%) · "
                      f"{len(self.train_rows):,} train / {len(self.val_rows):,} validation examples"
                      + packed + f" · {self.total_steps} steps on {self.device} ({self.precision})")

    def _tracker(self) -> Tracker:
        """metrics.jsonl, and TensorBoard and/or MLflow as `train.tracking` says (MLflow gets the flat config as
        params)."""
        cfg, tc = self.cfg, self.cfg.train
        ml = tc.mlflow if "mlflow" in tc.tracking else None
        tags = {"tunelab.task": self.spec.name, "tunelab.base": cfg.model.base, "tunelab.method": cfg.method.name}
        return Tracker(self.out, "tensorboard" in tc.tracking, ml, flatten(self.run_record["config"]) if ml
                       else None, tags, bool(self.resume), warn=lambda msg: print_warnings([msg], self.console))

    def epoch_windows(self) -> list[list[list[int]]]:
        """This epoch's optimizer steps: length-grouped micro-batches (seeded by the epoch), `grad_accum` each."""
        tc = self.tc
        batches = length_grouped_batches(self.lengths, tc.batch_size, tc.seed + self.state.epoch, tc.group_by_length)
        return [batches[i:i + tc.grad_accum] for i in range(0, len(batches), tc.grad_accum)]

    def step(self, window: list[list[int]], windows: int) -> None:
        """One window: the optimizer step (or a skipped one), its log line, and what is due after it."""
        loss = self._optimizer_step(window)
        if loss is None:  # a non-finite step skipped: the window's data is consumed, nothing else is due
            return
        self._log(loss, windows)
        n = self.tc.evals_per_epoch  # the k-th of an epoch's n evaluations comes after round(k * windows / n) windows
        due = (self.state.step % self.tc.eval_every == 0) if self.tc.eval_every else (
            self.state.window in {round(k * windows / n) for k in range(1, n + 1)})
        if due or self.state.step == self.total_steps:
            self._evaluate()
        save_due = (self.state.step % self.tc.save_every == 0) if self.tc.save_every else due
        saved = save_due and self.state.step < self.total_steps and not self.stop and self.checkpoints
        if saved:
            self.save()
        self._check_stop_request(saved)

    def _optimizer_step(self, window: list[list[int]]) -> float | None:
        """Backward over the window (each micro-batch split in halves again after an out-of-memory error, when
        `train.auto_batch_size` allows), clip, then step, or apply the non-finite policy -> the loss, or None
        when the update was skipped."""
        tc, state, model, optimizer = self.tc, self.state, self.model, self.optimizer
        model.train()
        while True:
            try:
                loss = accumulate_gradients(model, self.task, self.tr, window, self.device, self.precision,
                                            self.split, self.dd.shard, keep_empty=self.dd.fsdp,
                                            loss_scale=self.dd.world if self.dd.fsdp else 1.0,
                                            adversary=self.adversary)
                self.dd.all_reduce_grads(self.params)
                loss = self.dd.sum(loss, self.device)
                break
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err):
                    raise
                optimizer.zero_grad(set_to_none=True)
                if not tc.auto_batch_size or self.split >= max(len(b) for b in window):
                    raise UserError(_oom_message(state.step + 1, tc, self.cfg, self.split)) from None
                self.split *= 2
                self.progress.note(f"step {state.step + 1}: out of memory; retrying with each micro-batch split "
                                   f"in {self.split} (train.auto_batch_size)")
        if self.anchor is not None:
            self.penalty = self.anchor.add_grad()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm or float("inf"))
        if distributed.is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            self._skip_nonfinite(loss, float(grad_norm))
            return None
        self.nonfinite_in_row = 0
        optimizer.step()
        self.scheduler.step()
        if self.cfg.method.name == "adalora":  # AdaLoRA re-allocates its rank budget before the zeroing
            model.base_model.update_and_allocate(state.step)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.window += 1
        state.examples_seen += sum(len(b) for b in window)
        state.tokens_seen += sum(self.lengths[i] for b in window for i in b)
        return loss

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """`train.on_nonfinite`: stop naming the step, or skip the update (up to `max_nonfinite_in_row`)."""
        tc, state = self.tc, self.state
        self.optimizer.zero_grad(set_to_none=True)
        if tc.on_nonfinite == "stop":
            raise UserError(f"non-finite loss or gradient at step {state.step + 1} (loss {loss}, grad norm "
                            f"{grad_norm}); lower train.lr or set train.on_nonfinite: skip; last good checkpoint: "
                            f"{_last_checkpoint(self.out)}")
        state.nonfinite_skipped += 1
        self.nonfinite_in_row += 1
        self.progress.note(f"step {state.step + 1}: non-finite loss or gradient; update skipped "
                           f"({self.nonfinite_in_row} in a row, {state.nonfinite_skipped} in all)")
        if self.nonfinite_in_row >= tc.max_nonfinite_in_row:
            raise UserError(f"{self.nonfinite_in_row} non-finite steps in a row (up to step {state.step + 1}); "
                            f"stopping; last good checkpoint: {_last_checkpoint(self.out)}")
        state.window += 1  # the window's data is consumed; no update, no schedule step

    def _log(self, loss: float, windows: int) -> None:
        """The progress bar or line every step; the mean loss into metrics.jsonl every `log_every` steps."""
        state = self.state
        self.window_loss += loss
        self.window_count += 1
        busy = max(1e-9, time.perf_counter() - self.t_start - self.eval_time)
        rate = (state.examples_seen - self.seen_at_start) / busy
        shown_rate = (state.tokens_seen - self.tokens_at_start) / busy if self.spec.generates else rate
        lr = self.scheduler.get_last_lr()[0]
        self.progress.update(state.step, loss, lr, shown_rate)
        if state.step % self.tc.log_every == 0 or state.step == self.total_steps:
            self.tracker.log(state.step, train_loss=self.window_loss / self.window_count, lr=lr,
                             examples_per_s=rate, epoch=state.epoch + state.window / windows,
                             **({"penalty": self.penalty} if self.anchor is not None else {}))
            self.window_loss, self.window_count = 0.0, 0

    def run_eval(self) -> dict:
        """The validation metrics of the model as it is now."""
        metrics = self.task.evaluate(self.model, self.va, self.tc.eval_batch_size)
        if self.dd.fsdp:  # a forward without backward leaves the root's weights gathered
            self.model.reshard()
        return metrics

    def _evaluate(self) -> None:
        """Validation: keep the best weights, count evaluations without gain, stop early when patience ends."""
        state, task = self.state, self.task
        t_eval = time.perf_counter()
        self.last_eval = metrics = self.run_eval()
        score = metrics[task.metric]
        improved = state.best_metric is None or self.better(score, state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.bad_evals = score, state.step, 0
            self.best_weights = trainable_state(self.model)
        else:
            state.bad_evals += 1
        self.tracker.log(state.step, **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        extra = f" accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""
        self.progress.note(f"step {state.step}: validation {METRIC_NAMES.get(task.metric, task.metric)} "
                           f"{score:.4f}{extra} loss {metrics['loss']:.4f}" + (" (best)" if improved else ""))
        self.eval_time += time.perf_counter() - t_eval
        if self.tc.early_stopping_patience and state.bad_evals >= self.tc.early_stopping_patience:
            self.progress.note(f"early stopping: no gain in {state.bad_evals} evaluations")
            self.stop = True
        if self.on_eval is not None and self.on_eval(EvalPoint(
                state.step, state.step / self.windows_per_epoch, state.examples_seen, score, state.best_metric,
                metrics)):
            self.progress.note(f"step {state.step}: pruned (stopped without a model dir)")
            self.pruned = self.stop = True

    def save(self) -> None:
        """A checkpoint of this step (every rank takes part under FSDP; rank 0 writes)."""
        _save(self.out, self.state, self.model, self.best_weights, self.optimizer, self.scheduler,
              self.tc.keep_last, self.run_record, self.dd.main, self.dd.fsdp)
        self.saved_step = self.state.step

    def _check_stop_request(self, saved: bool) -> None:
        """A SIGTERM/SIGINT asked for a stop: checkpoint this step (unless just done) and stop. Under torchrun
        every rank stops at the same step, whichever got the signal first."""
        stop_asked = self.stop_req.requested is not None
        if self.dd.enabled:
            stop_asked = self.dd.sum(float(stop_asked), self.device) > 0
            self.stop_req.requested = (self.stop_req.requested or "SIGTERM") if stop_asked else None
        if stop_asked and not self.stop and self.state.step < self.total_steps:
            if not saved and self.checkpoints:
                self.save()
            self.interrupted = self.stop = True

    def finish(self) -> dict | None:
        """The last step checkpointed, then the model dir; a signal from here stops at once (the checkpoint
        holds the run) -> `_finish`'s result, or None when stopped."""
        self.state.done = True
        if self.saved_step != self.state.step and self.checkpoints:  # a stop from here loses nothing
            self.save()
        try:
            if not self.dd.enabled:  # under torchrun every rank must reach the collectives: a flag there
                self.stop_req.raise_from_now()
            return _finish(self.cfg, self.out, self.dd, self.model, self.tokenizer, self.base, self.task, self.spec,
                           self.meta, self.data_dir, self.train_rows, self.state, self.best_weights, self.last_eval,
                           self.run_eval, self.precision, self.fit, self.replay, self.val_rows)
        except StopRequested:
            self.interrupted = True
            return None

    def summary(self, result: dict | None) -> dict:
        """The closing line and the summary `train` returns: where the model is, or how to continue."""
        self.progress.close()
        state, tracker, out = self.state, self.tracker, self.out
        elapsed = time.perf_counter() - self.t_start
        train_time = elapsed - self.eval_time  # examples/s counts training only, not the validation passes
        rate = (state.examples_seen - self.seen_at_start) / max(train_time, 1e-9)
        if result is None and self.pruned:
            tracker.log(state.step, pruned=True, elapsed_s=elapsed)
            tracker.close("KILLED")
            self.dd.close()
            return {"pruned": True, "steps": state.step, "total_steps": self.total_steps, "task": self.spec.name,
                    "best_metric": state.best_metric, "epochs_trained": state.step / self.windows_per_epoch,
                    "examples_seen": state.examples_seen, "elapsed_s": elapsed}
        if result is None:
            checkpoint = _last_checkpoint(out)
            tracker.log(state.step, interrupted=self.stop_req.requested, elapsed_s=elapsed)
            tracker.close("KILLED")
            where = " (the final save was not finished)" if state.done else ""
            self.console.print(f"[bold yellow]stopped[/] by {self.stop_req.requested} at step {state.step} of "
                               f"{self.total_steps}{where}; checkpoint {plain(checkpoint)}; continue with: "
                               f"{plain(resume_command(out))}", soft_wrap=True)
            self.dd.close()
            return {"interrupted": self.stop_req.requested, "steps": state.step, "total_steps": self.total_steps,
                    "checkpoint": checkpoint, "task": self.spec.name, "resume": resume_command(out)}
        self.dd.close()
        tokens_rate = (state.tokens_seen - self.tokens_at_start) / max(train_time, 1e-9)
        tracker.log(state.step, done=True, train_examples_per_s=rate, train_tokens_per_s=tokens_rate,
                    elapsed_s=elapsed, eval_s=self.eval_time)
        tracker.close("FINISHED", Path(result["model_dir"]))
        metric = METRIC_NAMES.get(self.task.metric, self.task.metric)
        per_unit = f" · {tokens_rate:,.0f} tokens/s" if self.spec.served_as != "classify" else ""
        self.console.print(f"[bold green]saved[/] {plain(result['model_dir'])} · best validation {metric} "
                           f"{state.best_metric:.4f} at step {state.best_step} · {rate:.1f} examples/s{per_unit}")
        return {"model_dir": str(result["model_dir"]), "task": self.spec.name, "steps": state.step,
                "best_metric": state.best_metric, "epochs_trained": state.step / self.windows_per_epoch,
                "best_step": state.best_step, "validation": result["validation"],
                "nonfinite_skipped": state.nonfinite_skipped, "examples_seen": state.examples_seen,
                "examples_per_s": rate, "tokens_per_s": tokens_rate, "elapsed_s": elapsed, "train_s": train_time}


def _finish(cfg: RunConfig, out: Path, dd, model, tokenizer, base, task, spec: TaskSpec, meta: dict, data_dir: Path,
            train_rows: list[dict], state: LoopState, best_weights, last_eval: dict | None, run_eval,
            precision: str, fit: dict, replay: dict | None = None, reference_rows: list[dict] = ()) -> dict:
    """The best weights, their validation metrics, and the model dir (replaced by a swap, never half-written)."""
    if best_weights is not None:
        load_trainable_state(model, best_weights)
    fresh = last_eval is not None and state.best_step == state.step
    best_eval = last_eval if fresh else run_eval()
    model_meta = {
        "task": spec.name, "labels": task.labels,
        "base": {"ref": cfg.model.base, "path": str(base.path),
                 **({"parent": parent} if (parent := parent_record(base)) else {})},
        "method": cfg.method.model_dump(mode="json"), "max_length": cfg.model.max_length,
        "data": {"dir": str(data_dir), "path": str(Path(data_dir).resolve()), "fingerprint": meta["fingerprint"],
                 "train_examples": len(train_rows), "max_train_examples": cfg.data.max_train_examples,
                 **({"replay": replay} if replay else {})},
        **({"regularize": cfg.train.regularize.model_dump(mode="json")} if cfg.train.regularize else {}),
        "metrics": {"validation": {k: v for k, v in best_eval.items() if isinstance(v, (int, float))}},
        "base_fit": fit,  # measured once, before training (`base_fit.measure`)
        "eval": cfg.eval.model_dump(mode="json"),
        "best_step": state.best_step, "steps": state.step, "seed": cfg.train.seed, "precision": precision,
        "versions": library_versions(),
        **getattr(task, "model_meta", {}),  # what rebuilds the task for `tunelab eval` (masked_lm: its masking)
    }
    if spec.generates:  # what a server needs to stop where training taught it to
        model_meta["stop"] = stop_tokens(tokenizer, chat=spec.conversations)
    extra = {}
    if dd.main and not dd.fsdp and hasattr(task, "drift_profile"):  # what a server compares its traffic with
        profile = task.drift_profile(model, reference_rows, cfg.train.seed)
        model_meta["drift_profile"], extra[drift.PROFILE_FILE] = profile.summary(), profile.to_bytes()
    full_state = distributed.full_model_state(model) if dd.fsdp else None  # gathered on every rank
    if not dd.fsdp:
        model.to("cpu")
    model_dir = out / "model"
    if dd.main:  # the run dir is this process's (locked): its model/ is replaced by the swap
        save_model_dir(model, tokenizer, model_dir, model_meta, state_dict=full_state, overwrite=True,
                       extra_files=extra)
    dd.barrier()
    return {"model_dir": model_dir, "validation": model_meta["metrics"]["validation"]}


def check_run_dir(out: Path, resume: str | None, overwrite: bool, resumable: bool = True) -> None:
    """Refuse what this run may not write into (nothing is changed here; the swap comes once all loaded).
    `overwrite=True` checks only that `out` is free or a tunelab run; `resumable=False` (an update) leaves
    `--resume` out of the way out."""
    if resume:
        if not out.exists():
            raise UserError(f"--resume: no complete checkpoint in {out} (it does not exist)")
        if kind_of(out) != "run":
            raise UserError(f"--resume: {out} is not a tunelab run dir")
        return
    if check_target(out, "run", overwrite=True) and not overwrite and (
            ckpt.complete_checkpoints(out / "checkpoints") or (out / "model").exists()):
        resume_hint = "continue it with --resume auto, " if resumable else ""
        raise UserError(f"{out} already holds a run; {resume_hint}replace it with --overwrite, or choose another "
                        "--out")


def _open_run_dir(out: Path, cfg: RunConfig, fresh: bool, info: dict) -> None:
    """A fresh run dir (swapped in for an old run, which is removed only after the swap), or the resumed one
    cleaned of what a crash left behind (checkpoint folders without a manifest, an unfinished model/)."""
    record = {"kind": "run", **info, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": library_versions()}
    if fresh:
        with write_folder(out, "run", overwrite=True) as tmp:
            (tmp / META_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
            (tmp / "config.yaml").write_text(dump_config(cfg))
        return
    recover(out)  # an interrupted swap of the run dir itself (--overwrite)
    recover(out / "model")
    ckpt.clean_incomplete(out / "checkpoints")
    if not (out / META_FILE).is_file():  # a run dir from before run dirs carried one
        ckpt.write_durably(out / META_FILE, json.dumps(record, indent=2, ensure_ascii=False))
    ckpt.write_durably(out / "config.yaml", dump_config(cfg))


def resume_command(out: Path) -> str:
    """The command that continues the run in `out` from its saved config, from any folder."""
    return f"tunelab train --out {shlex.quote(str(Path(out).resolve()))} --resume auto"


def _last_checkpoint(out: Path) -> str:
    done = ckpt.complete_checkpoints(out / "checkpoints")
    return str(done[-1]) if done else "none"


def _save(out: Path, state: LoopState, model, best_weights, optimizer, scheduler, keep_last: int,
          run_record: dict, write: bool = True, fsdp: bool = False) -> None:
    weights = trainable_state(model)  # under FSDP these gathers are collectives: every rank comes here
    optim_state = distributed.optimizer_state(model, optimizer, fsdp)
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # never write a checkpoint that cannot be resumed from
        raise UserError(f"non-finite weights after step {state.step} ({bad[0]} …); not saving a checkpoint; "
                        f"lower train.lr; last good checkpoint: {_last_checkpoint(out)}")
    if not write:  # data-parallel ranks other than 0 hold the same weights; rank 0 writes them
        return
    loop_state = {"loop": asdict(state), **run_record}
    extra = {} if best_weights is None or state.best_step == state.step else best_weights
    ckpt.save_checkpoint(out / "checkpoints", state.step, weights, optimizer, scheduler, loop_state, keep_last,
                         keep={state.best_step} if state.best_step else set(),
                         best_weights=extra, optimizer_state=optim_state)


def _resume(out: Path, resume: str, force: bool, run_record: dict, model, optimizer, scheduler,
            console: Console, fsdp: bool = False) -> tuple[LoopState, dict | None]:
    d, weights, trainer, saved, best = ckpt.load_resume(out, resume, note=lambda msg: console.print(
        f"[bold yellow]{plain(msg)}[/]", highlight=False, soft_wrap=True))
    diffs = [k for k in _differences(_with_defaults(own_method_sections(saved["config"])), run_record["config"])
             if not k.startswith(NOT_RESUME_CHANGES)]
    if saved["data_fingerprint"] != run_record["data_fingerprint"]:
        diffs.append("data fingerprint")
    if diffs and not force:
        raise UserError(f"cannot resume from {d}: changed since the checkpoint: {', '.join(diffs)} "
                        "(pass --force to resume anyway)")
    load_trainable_state(model, weights)
    distributed.load_optimizer_state(model, optimizer, trainer["optimizer"], fsdp)
    scheduler.load_state_dict(trainer["scheduler"])
    ckpt.set_rng_state(trainer["rng"])
    state = LoopState(**saved["loop"])
    console.print(f"[bold]resumed[/] from {plain(d)} at step {state.step}"
                  + (f" (forced; changed: {plain(diffs)})" if diffs else ""), soft_wrap=True)
    run_record["resumed_from"] = {"checkpoint": str(d), "forced_changes": diffs}
    best_weights = best or (weights if state.best_step == state.step else None)
    return state, best_weights


# where metrics are recorded changes nothing the checkpoint holds: not a change that needs --force to resume
NOT_RESUME_CHANGES = ("train.tracking", "train.mlflow.")


def _with_defaults(raw: dict) -> dict:
    """A saved config with the defaults of keys added since it was written (so they do not count as changes); as
    saved when it no longer validates (its keys then show as changes)."""
    try:
        return RunConfig.model_validate(raw).model_dump(mode="json")
    except ValueError:
        return raw


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    key = prefix.rstrip(".")
    return [] if a == b else [key]
