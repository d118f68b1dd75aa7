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
from tunelab.config import RunConfig, dump_config
from tunelab.data.dataset import load_meta, load_split
from tunelab.data.prepare import PrepareOptions, prepare
from tunelab.data.split import seeded_subset
from tunelab.errors import UserError
from tunelab.evaluate import base_fit
from tunelab.evaluate.leakage import row_text
from tunelab.methods import MethodContext, apply_method, head_module_names
from tunelab.tasks import DATASET_TASKS, TaskSpec, task_spec
from tunelab.terminal import make_console, plain
from tunelab.models import count_parameters, library_versions, load_trainable_state, save_model_dir, trainable_state
from tunelab.train import checkpoint as ckpt
from tunelab.train import distributed
from tunelab.train.batching import length_grouped_batches
from tunelab.train.optim import build_optimizer, build_schedule
from tunelab.train.precision import autocast, resolve_precision
from tunelab.train.progress import TrainProgress
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
        for warning in meta.get("warnings", []):
            console.print(f"[bold yellow]warning:[/] {plain(warning)}", soft_wrap=True)
    return d, {"source": p.source, "dir": str(d.resolve()), "fingerprint": meta["fingerprint"],
               "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}


METRIC_NAMES = {"macro_f1": "macro-F1", "entity_f1": "entity F1"}


def resolve_task(cfg: RunConfig, meta: dict, data_dir: Path) -> str:
    wanted = DATASET_TASKS.get(meta.get("task"))
    if wanted is None:
        raise UserError(f"{data_dir}: unknown dataset task '{meta.get('task')}'")
    if cfg.task not in ("auto", wanted):
        raise UserError(f"{data_dir} holds a '{meta.get('task')}' dataset, which trains task '{wanted}'; "
                        f"this config says task: {cfg.task}")
    return wanted


def accumulate_gradients(model, task, enc, window: list[list[int]], device: str, precision: str = "fp32",
                         split: int = 1, shard=None, keep_empty: bool = False, loss_scale: float = 1.0
                         ) -> float:
    """Backward over the micro-batches of one optimizer step -> the window's mean loss.

    Each micro-batch contributes (sum of its loss terms) / (loss terms in the whole window), so the
    accumulated gradient equals that of the mean loss over the window, whatever the micro-batch sizes;
    `split` cuts every micro-batch into that many smaller ones (less memory, the same gradient).
    `shard(idx)` -> this process's share of a micro-batch under data parallelism (normalisation stays
    global, so summing the ranks' gradients gives the single-process gradient). `keep_empty`: a rank
    whose share is empty still runs the micro-batch's forward and backward, at zero weight (FSDP's
    collectives need every rank in every forward). `loss_scale` multiplies the backward pass only (FSDP
    averages gradients over ranks; scaling by the world size turns that into the sum).
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
        with autocast(precision, device.split(":")[0]):
            loss = task.loss_sum(model, batch) * (w / max(1, n))
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


def train(cfg: RunConfig, out: str | Path, resume: str | None = None, force: bool = False,
          overwrite: bool = False, console: Console | None = None, show_progress: bool = True) -> dict:
    """Fine-tune `cfg.model.base` on `cfg.data` and write the run dir `out` (see ARCHITECTURE.md).

    The run dir is locked for the whole run (one writer; a second gets an error naming this process). A run
    dir that already holds checkpoints or a model is continued with `resume`, or replaced with `overwrite`
    (only once the config, the data and the model have loaded: a fresh run dir is swapped in for the old
    one); a folder tunelab did not write is refused. A stop at any moment (SIGTERM/SIGINT, including
    during the final evaluation and save) leaves a valid model dir or a checkpoint of the last step.
    Returns a summary: best validation metrics, steps, examples/s and the model dir path.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; choose one")
    # What tunelab may never write into is refused before the lock is taken (no lock file is left beside it);
    # whether an earlier run may be replaced is decided holding the lock, so a run in progress is named first.
    _check_run_dir(out, resume, overwrite=True)
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes the run dir
    with FolderLock(out) if writer else nullcontext():
        return _train(cfg, out, resume, force, overwrite, console, show_progress)


def _train(cfg: RunConfig, out: Path, resume: str | None, force: bool, overwrite: bool, console: Console | None,
           show_progress: bool) -> dict:
    tc = cfg.train
    dd = distributed.from_env(tc.dist_timeout_s, tc.distributed)  # one process unless started by torchrun
    console = console or make_console(stderr=True)
    if not dd.main:  # rank 0 speaks for the job
        console, show_progress = Console(file=io.StringIO()), False
    _check_run_dir(out, resume, overwrite)  # again, holding the lock
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = f"cuda:{dd.local_rank}" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(tc.precision, device.split(":")[0])

    prepared = ensure_dataset(cfg, console)[1] if dd.main else None
    dd.barrier()
    data_dir = ensure_dataset(cfg)[0]
    meta = load_meta(data_dir)
    spec = task_spec(resolve_task(cfg, meta, data_dir))
    task_name, stratify = spec.name, spec.stratify
    train_rows = seeded_subset(load_split(data_dir, "train"), cfg.data.max_train_examples, tc.seed, stratify)
    val_rows = seeded_subset(load_split(data_dir, "validation"), cfg.data.max_eval_examples, tc.seed, stratify)
    if not train_rows or not val_rows:
        raise UserError(f"{data_dir}: the train and validation splits must both have rows")

    # Seeded here, after the data was prepared and before the model is built: whatever ran before (building a
    # cached asset, preparing data) leaves the run's random draws alone, so a warm or cold cache trains the same.
    seed_everything(tc.seed)
    model, tokenizer, base, new_params, task = spec.build()(cfg, meta, train_rows)
    heads = tuple(head_module_names(model, new_params))
    tr, va = task.encode(train_rows), task.encode(val_rows)
    lengths = tr.lengths  # a property that builds the list: read it once, not per step
    windows_per_epoch = math.ceil(math.ceil(len(tr) / tc.batch_size) / tc.grad_accum)
    total_steps = tc.max_steps or math.ceil(tc.epochs * windows_per_epoch)
    model = apply_method(model, cfg.method, MethodContext(spec, new_params, total_steps,
                                                          None if base.ref == "scratch" else str(base.path)))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(device)
    if dd.fsdp:
        model = distributed.shard_model(model)
        if hasattr(task, "through_forward"):  # FSDP gathers root weights in the model's forward only
            task.through_forward = True
    adalora = cfg.method.name == "adalora"

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.head_lr, heads, kind=tc.optimizer,
                                fused=not dd.fsdp)
    scheduler = build_schedule(optimizer, tc.schedule, total_steps, round(tc.warmup_ratio * total_steps))
    better = (lambda a, b: a > b) if task.greater_is_better else (lambda a, b: a < b)

    state, best_weights = LoopState(), None
    run_record = {"config": cfg.model_dump(mode="json"), "data_fingerprint": meta["fingerprint"]}
    if resume:
        state, best_weights = _resume(out, resume, force, run_record, model, optimizer, scheduler, console,
                                      dd.fsdp)
    if dd.main:
        _open_run_dir(out, cfg, fresh=not resume, info={
            "name": cfg.name, "task": task_name, "base": cfg.model.base,
            "data": {"dir": str(Path(data_dir).resolve()), "fingerprint": meta["fingerprint"],
                     **({"prepared_by_this_run": prepared} if prepared else {})}})
    tracker = Tracker(out) if dd.main else NullTracker()
    if resume:  # the record says where the run continued from, and what --force let through
        tracker.log(state.step, **run_record.get("resumed_from", {}))
    fit = base_fit.measure(tokenizer, [row_text(r) for r in train_rows])
    if (warning := base_fit.advice(fit, cfg.model.base)) is not None:  # before an hour is spent on it
        console.print(f"[bold yellow]warning:[/] {plain(warning)}", soft_wrap=True)
    n_train, n_total = count_parameters(model)
    console.print(f"[bold]train[/] {task_name} · {plain(cfg.model.base)} · method {cfg.method.name} · "
                  f"trainable {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%) · "
                  f"{len(train_rows):,} train / {len(val_rows):,} validation examples"
                  + (f" in {len(tr):,} + {len(va):,} packed blocks" if getattr(task, "packing", False) else "")
                  + f" · {total_steps} steps on {device} ({precision})")

    lm = spec.generates
    metric_name = METRIC_NAMES.get(task.metric, task.metric)
    progress = TrainProgress(total_steps, state.step, enabled=show_progress, console=console,
                             unit="tok/s" if lm else "ex/s")
    t_start, seen_at_start, eval_time = time.perf_counter(), state.examples_seen, 0.0
    tokens_at_start = state.tokens_seen
    window_loss, window_count, last_eval = 0.0, 0, None
    split, nonfinite_in_row = 1, 0
    stop, saved_step = state.done, state.step if resume else None
    stop_req = StopRequest(lambda name: progress.note(f"{name}: finishing this step, then a checkpoint "
                                                       "(a second Ctrl-C stops at once)"))
    interrupted = False

    def run_eval() -> dict:
        metrics = task.evaluate(model, va, tc.eval_batch_size)
        if dd.fsdp:  # a forward without backward leaves the root's weights gathered
            model.reshard()
        return metrics

    def save() -> None:
        nonlocal saved_step
        _save(out, state, model, best_weights, optimizer, scheduler, tc.keep_last, run_record, dd.main, dd.fsdp)
        saved_step = state.step

    with stop_req:
        while not stop and state.step < total_steps:
            batches = length_grouped_batches(lengths, tc.batch_size, tc.seed + state.epoch, tc.group_by_length)
            windows = [batches[i:i + tc.grad_accum] for i in range(0, len(batches), tc.grad_accum)]
            for window in windows[state.window:]:
                model.train()
                n = sum(len(b) for b in window)
                while True:
                    try:
                        loss_value = accumulate_gradients(model, task, tr, window, device, precision, split,
                                                             dd.shard, keep_empty=dd.fsdp,
                                                             loss_scale=dd.world if dd.fsdp else 1.0)
                        dd.all_reduce_grads(params)
                        loss_value = dd.sum(loss_value, device)
                        break
                    except (torch.OutOfMemoryError, RuntimeError) as err:
                        if not _is_oom(err):
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        largest = max(len(b) for b in window)
                        if not tc.auto_batch_size or split >= largest:
                            raise UserError(_oom_message(state.step + 1, tc, cfg, split)) from None
                        split *= 2
                        progress.note(f"step {state.step + 1}: out of memory; retrying with each micro-batch split "
                                      f"in {split} (train.auto_batch_size)")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))
                if distributed.is_dtensor(grad_norm):
                    grad_norm = grad_norm.full_tensor()
                if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                    optimizer.zero_grad(set_to_none=True)
                    if tc.on_nonfinite == "stop":
                        raise UserError(f"non-finite loss or gradient at step {state.step + 1} (loss {loss_value}, "
                                        f"grad norm {float(grad_norm)}); lower train.lr or set "
                                        f"train.on_nonfinite: skip; last good checkpoint: {_last_checkpoint(out)}")
                    state.nonfinite_skipped += 1
                    nonfinite_in_row += 1
                    progress.note(f"step {state.step + 1}: non-finite loss or gradient; update skipped "
                                  f"({nonfinite_in_row} in a row, {state.nonfinite_skipped} in all)")
                    if nonfinite_in_row >= tc.max_nonfinite_in_row:
                        raise UserError(f"{nonfinite_in_row} non-finite steps in a row (up to step {state.step + 1}); "
                                        f"stopping; last good checkpoint: {_last_checkpoint(out)}")
                    state.window += 1  # the window's data is consumed; no update, no schedule step
                    continue
                nonfinite_in_row = 0
                optimizer.step()
                scheduler.step()
                if adalora:  # AdaLoRA re-allocates its rank budget between the step and zeroing the gradients
                    model.base_model.update_and_allocate(state.step)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.window += 1
                state.examples_seen += n
                state.tokens_seen += sum(lengths[i] for b in window for i in b)
                window_loss += loss_value
                window_count += 1

                busy = max(1e-9, time.perf_counter() - t_start - eval_time)
                rate = (state.examples_seen - seen_at_start) / busy
                shown_rate = (state.tokens_seen - tokens_at_start) / busy if lm else rate
                lr = scheduler.get_last_lr()[0]
                progress.update(state.step, loss_value, lr, shown_rate)
                if state.step % tc.log_every == 0 or state.step == total_steps:
                    tracker.log(state.step, train_loss=window_loss / window_count, lr=lr, examples_per_s=rate,
                                epoch=state.epoch + state.window / len(windows))
                    window_loss, window_count = 0.0, 0

                end_of_epoch = state.window == len(windows)
                due = (state.step % tc.eval_every == 0) if tc.eval_every else end_of_epoch
                if due or state.step == total_steps:
                    t_eval = time.perf_counter()
                    last_eval = run_eval()
                    score = last_eval[task.metric]
                    improved = state.best_metric is None or better(score, state.best_metric)
                    if improved:
                        state.best_metric, state.best_step, state.bad_evals = score, state.step, 0
                        best_weights = trainable_state(model)
                    else:
                        state.bad_evals += 1
                    tracker.log(state.step, **{f"eval_{k}": v for k, v in last_eval.items()
                                               if isinstance(v, (int, float))})
                    extra = f" accuracy {last_eval['accuracy']:.4f}" if "accuracy" in last_eval else ""
                    progress.note(f"step {state.step}: validation {metric_name} {score:.4f}{extra} "
                                  f"loss {last_eval['loss']:.4f}"
                                  + (" (best)" if improved else ""))
                    eval_time += time.perf_counter() - t_eval
                    if tc.early_stopping_patience and state.bad_evals >= tc.early_stopping_patience:
                        progress.note(f"early stopping: no gain in {state.bad_evals} evaluations")
                        stop = True
                save_due = (state.step % tc.save_every == 0) if tc.save_every else due
                saved = save_due and state.step < total_steps and not stop
                if saved:
                    save()
                stop_asked = stop_req.requested is not None
                if dd.enabled:  # every rank stops at the same step, whichever got the signal first
                    stop_asked = dd.sum(float(stop_asked), device) > 0
                    stop_req.requested = (stop_req.requested or "SIGTERM") if stop_asked else None
                if stop_asked and not stop and state.step < total_steps:
                    if not saved:
                        save()
                    interrupted = stop = True
                if stop or state.step >= total_steps:
                    break
            else:
                state.epoch, state.window = state.epoch + 1, 0
                continue
            break
        if not interrupted:
            state.done = True
            if saved_step != state.step:  # the last step is checkpointed too: a stop from here on loses nothing
                save()
            try:
                if not dd.enabled:  # from here a signal stops at once (the checkpoint holds the run); under
                    stop_req.raise_from_now()  # torchrun every rank must reach the collectives: a flag there
                result = _finish(cfg, out, dd, model, tokenizer, base, task, spec, meta, data_dir, train_rows,
                                 state, best_weights, last_eval, run_eval, precision, fit)
            except StopRequested:
                interrupted = True
    progress.close()
    elapsed = time.perf_counter() - t_start
    train_time = elapsed - eval_time  # examples/s counts training only, not the validation passes
    rate = (state.examples_seen - seen_at_start) / max(train_time, 1e-9)
    if interrupted:
        checkpoint = _last_checkpoint(out)
        tracker.log(state.step, interrupted=stop_req.requested, elapsed_s=elapsed)
        tracker.close()
        where = " (the final save was not finished)" if state.done else ""
        console.print(f"[bold yellow]stopped[/] by {stop_req.requested} at step {state.step} of {total_steps}"
                      f"{where}; checkpoint {plain(checkpoint)}; continue with: "
                      f"{plain(resume_command(out))}", soft_wrap=True)
        dd.close()
        return {"interrupted": stop_req.requested, "steps": state.step, "total_steps": total_steps,
                "checkpoint": checkpoint, "task": task_name, "resume": resume_command(out)}
    dd.close()
    tokens_rate = (state.tokens_seen - tokens_at_start) / max(train_time, 1e-9)
    tracker.log(state.step, done=True, train_examples_per_s=rate, train_tokens_per_s=tokens_rate, elapsed_s=elapsed,
                eval_s=eval_time)
    tracker.close()
    model_dir = result["model_dir"]
    per_unit = f" · {tokens_rate:,.0f} tokens/s" if spec.served_as != "classify" else ""
    console.print(f"[bold green]saved[/] {plain(model_dir)} · best validation {metric_name} {state.best_metric:.4f} "
                  f"at step {state.best_step} · {rate:.1f} examples/s{per_unit}")
    return {"model_dir": str(model_dir), "task": task_name, "steps": state.step, "best_step": state.best_step,
            "validation": result["validation"], "nonfinite_skipped": state.nonfinite_skipped,
            "examples_per_s": rate, "tokens_per_s": tokens_rate, "elapsed_s": elapsed, "train_s": train_time}


def _finish(cfg: RunConfig, out: Path, dd, model, tokenizer, base, task, spec: TaskSpec, meta: dict, data_dir: Path,
            train_rows: list[dict], state: LoopState, best_weights, last_eval: dict | None, run_eval,
            precision: str, fit: dict) -> dict:
    """The best weights, their validation metrics, and the model dir (replaced by a swap, never half-written)."""
    if best_weights is not None:
        load_trainable_state(model, best_weights)
    fresh = last_eval is not None and state.best_step == state.step
    best_eval = last_eval if fresh else run_eval()
    model_meta = {
        "task": spec.name, "labels": getattr(task, "labels", []),
        "base": {"ref": cfg.model.base, "path": str(base.path)},
        "method": cfg.method.model_dump(mode="json"), "max_length": cfg.model.max_length,
        "data": {"dir": str(data_dir), "path": str(Path(data_dir).resolve()), "fingerprint": meta["fingerprint"],
                 "train_examples": len(train_rows), "max_train_examples": cfg.data.max_train_examples},
        "metrics": {"validation": {k: v for k, v in best_eval.items() if isinstance(v, (int, float))}},
        "base_fit": fit,  # measured once, before training (`base_fit.measure`)
        "eval": cfg.eval.model_dump(mode="json"),
        "best_step": state.best_step, "steps": state.step, "seed": cfg.train.seed, "precision": precision,
        "versions": library_versions(),
    }
    if spec.generates:  # what a server needs to stop where training taught it to
        from tunelab.tasks.sft import stop_tokens

        model_meta["stop"] = stop_tokens(tokenizer, chat=spec.conversations)
    full_state = distributed.full_model_state(model) if dd.fsdp else None  # gathered on every rank
    if not dd.fsdp:
        model.to("cpu")
    model_dir = out / "model"
    if dd.main:  # the run dir is this process's (locked): its model/ is replaced by the swap
        save_model_dir(model, tokenizer, model_dir, model_meta, state_dict=full_state, overwrite=True)
    dd.barrier()
    return {"model_dir": model_dir, "validation": model_meta["metrics"]["validation"]}


def _check_run_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse what this run may not write into (nothing is changed here; the swap comes once all loaded).
    `overwrite=True` checks only that `out` is free or a tunelab run."""
    if resume:
        if not out.exists():
            raise UserError(f"--resume: no complete checkpoint in {out} (it does not exist)")
        if kind_of(out) != "run":
            raise UserError(f"--resume: {out} is not a tunelab run dir")
        return
    if check_target(out, "run", overwrite=True) and not overwrite and (
            ckpt.complete_checkpoints(out / "checkpoints") or (out / "model").exists()):
        raise UserError(f"{out} already holds a run; continue it with --resume auto, replace it with "
                        "--overwrite, or choose another --out")


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
    diffs = _differences(saved["config"], run_record["config"])
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


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    key = prefix.rstrip(".")
    return [] if a == b else [key]
