"""The one training loop: every method (a network wrapped to return `(loss, logs)`) trains here.

Reading order: `train` -> `setup` (data, model, optimiser, resume) -> `train_epoch` (the per-step hot path:
fetch accum_iter micro-batches, `Stepper.step`, nothing read back) -> `_sync` every few steps (one all-reduce of
the losses and the stop flags: non-finite check, log line, mid-epoch checkpoint) -> `end_of_epoch` (engine/
epoch_end.py: evaluate, checkpoint, visuals).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import NonFiniteLoss, Stopped, UserError
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .compute import Compute, flop_counter
from .dist import (STOP_SIGNALS, DistEnv, barrier, broadcast_object, cpu_cores, loader_workers,  # noqa: F401
                   local_world_size, rank_agreement)  # cpu_cores: re-exported for callers of engine.loop
from .epoch_end import (BEST_NAME, _warn_slow_loader, checkpoint_state, end_of_epoch,  # noqa: F401 (re-export)
                        visual_batch)
from .evaluate import eval_loader
from .loader import make_loader
from .log import LOGGER, close_logging, setup_logging
from .run_folder import RunLock, finished_run, refuse_or_move_aside
from .rng import local_rng_state, restore_rng_state, seed_everything
from .step import (Stepper, StepTimer, check_accum, choose_precision, compile_network, eager_keys, global_settings,
                   make_ema)

CKPT_NAME = "last_epoch_ckpt.pth.tar"
STOP_CHECK_SECONDS = 5.0  # read the stop flags at least this often (agreed step count), so a stop fits torchrun's 30 s


@dataclass
class RunResult:
    epochs_done: int = 0
    last_loss: float = float("nan")
    checkpoint: Optional[str] = None
    visuals: list[str] = field(default_factory=list)
    top1: Optional[float] = None
    top5: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation (recipe.evaluate)
    compute: dict[str, Any] = field(default_factory=dict)  # FLOPs, images, device-hours (engine/compute.py)
    seconds: float = 0.0
    metrics_ema: dict[str, float] = field(default_factory=dict)  # the last evaluation of the EMA (model_ema=True)
    compiled_graphs: Optional[int] = None  # compile=True: graphs torch.compile compiled in the first steps


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    return (f"{d}d " if d else "") + f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


@dataclass
class Run:
    """Everything `setup` builds, and the counters the epochs carry."""
    recipe: Any
    env: DistEnv
    out: Any
    amp: bool
    loader: Any
    val_loader: Any
    iters: int  # optimizer steps per epoch
    micro: int  # images per micro-batch and process
    workers: int
    method: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    precision: Any
    ema: Any
    stepper: Stepper
    compute: Compute
    stopper: "StopSignals"
    result: RunResult
    ckpt_file: Any
    start_epoch: int = 0
    skip: int = 0  # optimizer steps of start_epoch done before the checkpoint (mid-epoch resume)
    mid_epoch_rng: tuple = (None, None)
    best: dict = field(default_factory=dict)
    data_report: dict = field(default_factory=dict)
    tb: Any = None
    vis_images: Any = None
    epoch_rng: Any = None
    epoch_wait: dict = field(default_factory=dict)
    check_every: int = 1  # steps between reads of the flags (agreed by all ranks at every read)
    step_seconds: float = 0.0  # this rank's seconds per step in the last window (0: not measured yet)
    shown: dict = field(default_factory=dict)  # steps, seconds, data wait since the last log line
    steps_run: int = 0
    t_train: float = 0.0
    graphs_before: int = 0  # compiled_graphs() before this run compiled anything


def train(recipe, env: DistEnv, *, resume: Optional[str] = None, init_ckpt: Optional[str] = None,
          amp: bool = False, resume_requested: bool = False, overwrite: bool = False) -> RunResult:
    """Train `recipe` in this process (one rank of `env`). `resume_requested` with `resume=None` means `--resume`.
    The output folder is locked for the run (one run per folder). A fresh run into a folder that holds a checkpoint
    is refused, unless `overwrite` (`--overwrite`) moves the old checkpoints aside; `--resume` of a run that has
    nothing left to do says so and returns."""
    t_start = time.time()
    if overwrite and resume_requested:
        raise UserError("--overwrite starts the run over and --resume continues it: give one of them")
    out = _output_dir(recipe, env)
    lock = _lock_folder(out, env)
    try:
        notices = [lock.notice] if lock and lock.notice else []
        finished, init_ckpt = _check_folder(recipe, env, out, resume, resume_requested, overwrite, init_ckpt, notices)
        if finished is not None:
            return finished
        return _train(recipe, env, out, resume, init_ckpt, amp, resume_requested, t_start, notices)
    finally:
        if lock:
            lock.release()


def _train(recipe, env, out, resume, init_ckpt, amp, resume_requested, t_start, notices) -> RunResult:
    log_path = setup_logging(out, env.rank)
    try:
        for notice in notices:
            LOGGER.info("%s", notice)
        with global_settings(recipe, env, amp):
            run = setup(recipe, env, out, resume, init_ckpt, amp, resume_requested, log_path)
            try:
                for epoch in range(run.start_epoch, recipe.max_epoch):
                    stop_now, save_now = train_epoch(run, epoch)
                    end_of_epoch(run, epoch, stop_now, save_now)
            finally:
                run.stopper.close()
                if hasattr(run.loader, "close"):
                    run.loader.close()
                if run.tb:
                    run.tb.close()
            return _finish(run, t_start)
    finally:
        close_logging()


def _lock_folder(out, env: DistEnv) -> Optional[RunLock]:
    """Rank 0 takes the folder's lock (run_folder.py); a refusal stops every rank with rank 0's line."""
    lock = None
    try:
        with rank_agreement(env, "output folder lock"):
            if env.is_main:
                lock = RunLock(out).acquire()
    except BaseException:
        if lock:
            lock.release()
        raise
    return lock


def _check_folder(recipe, env: DistEnv, out, resume, resume_requested: bool, overwrite: bool, init_ckpt,
                  notices: list) -> tuple[Optional[RunResult], Optional[str]]:
    """Rank 0 reads the folder, every rank follows: a fresh run over a checkpoint is refused (or, with `overwrite`,
    moves it aside: `init_ckpt` follows a moved file); `--resume` of a run with nothing left to do ends here with
    one line (returned as its RunResult)."""
    verdict = None
    with rank_agreement(env, "output folder"):
        if env.is_main and resume_requested:
            verdict = finished_run(checkpoint_path(out, resume), recipe.max_epoch)
        elif env.is_main:
            option = "save_folder_prefix" if "save_folder_prefix" in recipe.fields() else "exp_name"
            moved = refuse_or_move_aside(out, (CKPT_NAME, BEST_NAME), overwrite, option)
            if moved:
                notices.append(f"notice: --overwrite: the previous run's checkpoints are moved to {moved[0].parent}")
                old = {str((out / p.name).resolve()): str(p) for p in moved}
                init_ckpt = old.get(str(Path(init_ckpt).resolve()), init_ckpt) if init_ckpt else init_ckpt
    verdict, init_ckpt = broadcast_object((verdict, init_ckpt), env)
    if verdict is None:
        return None, init_ckpt
    setup_logging(None, env.rank)  # the console only: no log file for a run that does nothing
    try:
        for notice in notices:
            LOGGER.info("%s", notice)
        LOGGER.info("%s", verdict["line"])
    finally:
        close_logging()
    return RunResult(epochs_done=verdict["epochs"], last_loss=verdict["last_loss"],
                     checkpoint=verdict["checkpoint"]), init_ckpt


def _output_dir(recipe, env: DistEnv):
    out = recipe.output_path
    with rank_agreement(env, "output directory"):
        if env.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the output directory {out}: {e.strerror or e}; set output_dir= "
                                "to a writable folder (on several nodes: one every node can reach)") from None
    barrier(env)
    return out


# ----- setup ---------------------------------------------------------------------------------------------
def setup(recipe, env, out, resume, init_ckpt, amp, resume_requested, log_path) -> Run:
    LOGGER.info("mae-lite %s | torch %s | device %s | world size %d | log %s", _version(), torch.__version__,
                env.device, env.world_size, log_path)
    LOGGER.info("%s", recipe.config_table())
    seed_everything(recipe.seed, env.rank)
    local_procs = local_world_size(env)  # processes sharing this machine
    if env.device.type == "cpu" and local_procs > 1:
        torch.set_num_threads(max(1, cpu_cores() // local_procs))
    train_ds, loader, val_loader, micro, workers = _setup_data(recipe, env)
    iters = len(loader) // recipe.accum_iter
    if iters < 1:
        raise UserError(f"one epoch holds {len(loader)} micro-batches, fewer than accum_iter={recipe.accum_iter}; "
                        "lower accum_iter or -b")
    with rank_agreement(env, "model"):
        method = recipe.build_model().to(env.device)  # may read a teacher checkpoint
    optimizer = recipe.build_optimizer(method)
    schedule = recipe.build_schedule(optimizer, iters)
    precision = choose_precision(amp, recipe.amp_dtype, env.device)
    run = Run(recipe, env, out, amp, loader, val_loader, iters, micro, workers, method, optimizer, schedule,
              precision, None, None, Compute(), None, RunResult(), out / CKPT_NAME,
              best={f"best_{recipe.primary_metric}": 0.0, f"best_{recipe.primary_metric}_epoch": -1})
    with rank_agreement(env, "--resume/--ckpt"):
        ema_state = _resume(run, resume) if resume_requested else _initial_weights(run, init_ckpt)
    _wrap(run, ema_state)
    run.vis_images = (visual_batch(recipe, train_ds, env.device)
                      if env.is_main and hasattr(run.method, "save_visuals") else None)
    if env.is_main and recipe.enable_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.tb = SummaryWriter(str(out / f"tb_train-{time.strftime('%Y-%m-%d-%H-%M-%S')}"))
    run.result = RunResult(epochs_done=run.start_epoch, last_loss=run.result.last_loss,
                           checkpoint=str(run.ckpt_file) if run.ckpt_file.is_file() else None)
    run.compute.device = env.device.type
    run.check_every = recipe.print_interval
    LOGGER.info("training %d epochs x %d iterations, %d images per step (%d per process%s), lr %.3g, %s",
                recipe.max_epoch - run.start_epoch, iters, recipe.batch_size, recipe.batch_size // env.world_size,
                f" in {recipe.accum_iter} micro-batches of {micro}" if recipe.accum_iter > 1 else "",
                recipe.scaled_lr, precision.name)
    if recipe.warmup_epochs > recipe.max_epoch:
        LOGGER.info("notice: warmup_epochs (%d) > max_epoch (%d): the learning rate only ramps up in this run",
                    recipe.warmup_epochs, recipe.max_epoch)
    run.stopper = StopSignals(recipe.ckpt_interval_minutes)
    run.t_train = time.perf_counter()
    return run


def _setup_data(recipe, env):
    micro = check_accum(recipe.batch_size, env.world_size, recipe.accum_iter)
    with rank_agreement(env, "datasets"):
        datasets = recipe.build_datasets()
        train_ds = datasets["train"]
        if hasattr(train_ds, "__len__") and len(train_ds) < recipe.batch_size:
            raise UserError(f"the training set has {len(train_ds)} images, fewer than one batch "
                            f"(-b {recipe.batch_size}); lower -b")
    workers = loader_workers(recipe.num_workers, env)
    collate = recipe.collate_fn()
    loader = make_loader(train_ds, micro, env, workers, train=True, collate_fn=collate, seed=recipe.seed)
    val_loader = (eval_loader(datasets["eval"], recipe.batch_size // env.world_size, env, workers, collate_fn=collate)
                  if datasets.get("eval") is not None else None)
    return train_ds, loader, val_loader, micro, workers


def _initial_weights(run: Run, init_ckpt: Optional[str]) -> None:
    summary = run.recipe.load_initial_weights(run.method, init_ckpt)
    if summary:
        LOGGER.info("initial weights from %s", summary)


def _resume(run: Run, resume: Optional[str]) -> Optional[dict]:
    """Load --resume's checkpoint into the run; return its EMA weights (None: none saved)."""
    src = checkpoint_path(run.out, resume)
    if not src.is_file():
        raise UserError(f"--resume: no checkpoint at {src}; run without --resume to start, or give the file")
    ckpt = load_checkpoint(src)
    _check_arch(ckpt, run.recipe, src)
    try:
        run.method.load_state_dict(eager_keys(ckpt["model"]))
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"--resume: {src} does not match this recipe's model/optimizer "
                        f"({str(e).splitlines()[0][:160]})") from None
    run.schedule.load_state_dict(ckpt.get("scheduler", {}))
    if ckpt.get("scaler") and run.precision.scaler.is_enabled():
        run.precision.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch = int(ckpt["start_epoch"])
    run.best = {k: v for k, v in ckpt.items() if k.startswith("best_")} or run.best
    run.compute = Compute.from_state(ckpt.get("compute"))
    run.data_report = ckpt.get("data") or {}
    run.recipe.restore_data_report(run.data_report)  # run-wide counts (skipped bad images) go on
    run.skip = int(ckpt.get("iteration", 0))
    run.result.last_loss = float(ckpt.get("last_loss", float("nan")))
    if run.skip:  # a mid-epoch checkpoint: replay the epoch's data order, then continue from the saved state
        if ckpt.get("iters_per_epoch") != run.iters:
            raise UserError(f"--resume: {src} was saved in the middle of an epoch of {ckpt.get('iters_per_epoch')} "
                            f"iterations, but this run has {run.iters} per epoch; resume with the same -b, "
                            "accum_iter, data and processes")
        run.mid_epoch_rng = (ckpt.get("epoch_rng"), ckpt.get("rng"))
    else:
        restore_rng_state(ckpt.get("rng"), run.env)
    LOGGER.info("resumed from %s at epoch %d%s", src, run.start_epoch,
                f", iteration {run.skip} of epoch {run.start_epoch + 1}" if run.skip else "")
    return ckpt.get("model_ema")


def _wrap(run: Run, ema_state: Optional[dict]) -> None:
    """EMA (of the loaded weights, or the checkpoint's), compile, DDP, and the step that uses them."""
    recipe, env = run.recipe, run.env
    run.ema = make_ema(recipe, run.method)
    if run.ema is not None and ema_state:
        run.ema.module.load_state_dict(eager_keys(ema_state))
    elif run.ema is not None and run.start_epoch + run.skip > 0:
        LOGGER.info("notice: the checkpoint has no EMA weights (model_ema was off): the EMA starts from its model")
    if recipe.compile:
        run.graphs_before = compiled_graphs()
        compile_network(run.method)
    model = run.method
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    run.stepper = Stepper(recipe, model, run.method, run.optimizer, run.schedule, run.precision, run.ema, env.device,
                          run.iters * recipe.max_epoch)


# ----- one epoch: the per-step hot path ------------------------------------------------------------------
def train_epoch(run: Run, epoch: int) -> tuple[bool, bool]:
    """The epoch's optimizer steps; returns the (stop, checkpoint-due) flags read after its last step."""
    recipe, accum = run.recipe, run.recipe.accum_iter
    run.stepper.model.train()
    batches, first = _epoch_batches(run, epoch)
    bar = tqdm(total=run.iters, initial=first, desc=f"epoch {epoch + 1}/{recipe.max_epoch}",
               disable=not show_bar(run.env), dynamic_ncols=True, leave=False)
    run.epoch_wait = {"data": 0.0, "total": 0.0}
    window, timer, flags = [], StepTimer(run.env.device), (False, False)
    data_s, t_prev = 0.0, time.perf_counter()
    with bar:  # closed on a stop or a non-finite loss too, so log lines never land inside a stale bar
        for it in range(first, run.iters):
            micro = list(islice(batches, accum))
            t_data = time.perf_counter()
            if len(micro) < accum:  # a loader shorter than it said
                break
            loss, logs = _step(run, micro, epoch * run.iters + it)
            window.append(loss)
            data_s += t_data - t_prev
            t_now = time.perf_counter()
            if it > first:  # the first batch waits for the workers to start, whatever their speed
                run.epoch_wait["data"] += t_data - t_prev
                run.epoch_wait["total"] += t_now - t_prev
            t_prev = t_now
            run.steps_run += 1
            bar.update(1)
            if _sync_due(run, it, len(window)):
                flags = _sync(run, epoch, it, window, logs, timer, data_s, bar)
                window, data_s = [], 0.0
                timer.start()
                t_prev = time.perf_counter()  # the read and the log line are no data wait
        if window:  # a loader that ended early: check what is left before anything is saved
            flags = _sync(run, epoch, it - 1, window, logs, timer, data_s, bar)
    return flags


def show_bar(env: DistEnv) -> bool:
    """The progress bar on the main rank, on a terminal only: written to a file (SLURM, nohup, CI) its carriage-return
    frames would fill the log. The periodic log lines carry its numbers (loss, lr, img/s, eta) and the data wait."""
    return env.is_main and bool(getattr(sys.stderr, "isatty", lambda: False)())


def _step(run: Run, micro: list, step: int):
    if run.compute.flops_per_image is not None:
        return run.stepper.step(micro, step)
    with ExitStack() as counting:  # the run's first step also counts its FLOPs
        if run.recipe.compile:
            # Eager for this step: dynamo skips frames under a dispatch mode, and torch < ~2.13 marks them skipped
            # for good, so a compiled network first called under the counter would run eagerly all run long.
            counting.enter_context(torch.compiler.set_stance("force_eager"))
        counter = counting.enter_context(flop_counter())
        out = run.stepper.step(micro, step)
    run.compute.flops_per_image = counter.get_total_flops() / (run.micro * len(micro))
    return out


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (0 with compile=True: the network runs eagerly)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _report_compile(run: Run) -> None:
    """Once, after the first compiled steps: how many graphs dynamo compiled, so an eager fallback shows."""
    run.result.compiled_graphs = n = compiled_graphs() - run.graphs_before
    if n:
        LOGGER.info("compile: torch.compile compiled %d graph(s)", n)
    else:
        LOGGER.warning("warning: compile=True but torch.compile compiled no graph: the network runs eagerly")


def _epoch_batches(run: Run, epoch: int):
    """The loader's iterator for `epoch`, positioned after the done steps on a mid-epoch resume; and the first
    step's index. The loader's epoch seed is drawn from the state the interrupted epoch started from."""
    loader, skip = run.loader, run.skip
    if skip:
        restore_rng_state(run.mid_epoch_rng[0], run.env)  # the state this epoch's data order was drawn from
    run.epoch_rng = local_rng_state(run.env)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if not skip:
        return iter(loader), 0
    done = skip * run.recipe.accum_iter
    LOGGER.info("replaying the data order of epoch %d: skipping its first %d batches", epoch + 1, done)
    if hasattr(loader, "set_start"):
        loader.set_start(done)
        batches = iter(loader)
    else:  # a loader that cannot start mid-epoch: load the done batches and drop them
        batches = iter(loader)
        for _ in islice(batches, done):
            pass
    restore_rng_state(run.mid_epoch_rng[1], run.env)  # then the saved state takes over
    run.skip = 0
    return batches, skip


# ----- every few steps: one read of the device ------------------------------------------------------------
def _sync_due(run: Run, it: int, steps_in_window: int) -> bool:
    return ((it + 1) % run.recipe.print_interval == 0 or it + 1 == run.iters
            or steps_in_window >= run.check_every)


def _sync(run: Run, epoch: int, it: int, window: list, logs: dict, timer: StepTimer, data_s: float, bar) -> tuple:
    """Read the window's losses, the last step's logs and every rank's stop flags in one all-reduce; stop on a
    non-finite loss before anything is saved; log when a print is due; write a mid-epoch checkpoint when a
    signal or ckpt_interval_minutes asks. Identical decisions on every rank (they see the same reduced values)."""
    recipe, env, n = run.recipe, run.env, len(window)
    keys = [k for k, v in logs.items() if torch.is_tensor(v)]
    timer.stop()
    values = torch.cat([torch.stack(window).reshape(n), *(logs[k].detach().float().reshape(1) for k in keys),
                        torch.tensor([run.step_seconds], device=window[0].device)])
    reduced, stop, save = _sync_step(values, run.stopper, env)
    if recipe.compile and run.result.compiled_graphs is None and run.steps_run >= 2:  # step 1 runs eagerly
        _report_compile(run)
    seconds = timer.seconds()
    run.step_seconds = seconds / n
    _check_finite(run, reduced[:n], epoch, it - n + 1)
    run.result.last_loss = reduced[n - 1]
    if reduced[-1] > 0:  # every rank's mean step time: the same next read on every rank
        run.check_every = max(1, min(recipe.print_interval, int(STOP_CHECK_SECONDS / reduced[-1])))
    run.compute.add(recipe.batch_size * n, seconds, env.world_size)
    shown = run.shown = {k: run.shown.get(k, 0) + v for k, v in (("n", n), ("s", seconds), ("data", data_s))}
    if (it + 1) % recipe.print_interval == 0 or it + 1 == run.iters:
        extras = {k: reduced[n + i] for i, k in enumerate(keys)}
        extras.update({k: float(v) for k, v in logs.items() if not torch.is_tensor(v)})
        _log_progress(run, epoch, it, shown, extras, bar)
        run.shown = {}
    if (stop or save) and it + 1 < run.iters:  # mid-epoch; at the epoch's end the normal save runs
        _mid_epoch_checkpoint(run, epoch, it, stop)
    return stop, save


def _sync_step(values: torch.Tensor, stopper: "StopSignals", env: DistEnv) -> tuple[list[float], bool, bool]:
    """`values` (losses, logs, seconds per step) as means over the processes, and whether any process was asked to
    stop / has a checkpoint due: one all-reduce and one read of the device."""
    flags = torch.tensor([float(stopper.received is not None), float(stopper.save_due)], device=values.device)
    vec = torch.cat([values.float(), flags])
    if env.distributed:
        torch.distributed.all_reduce(vec)
    host = vec.tolist()
    k = len(values)
    return [v / env.world_size for v in host[:k]], host[k] > 0, host[k + 1] > 0


def _check_finite(run: Run, losses: list[float], epoch: int, first_it: int) -> None:
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            raise NonFiniteLoss(
                f"loss is {v} at epoch {epoch + 1}, iteration {first_it + i}: training stopped; the last checkpoint "
                f"({run.result.checkpoint or 'none written yet'}) is intact. Lower lr, set clip_grad=1.0 or drop "
                "--amp, then continue with --resume")


def _log_progress(run: Run, epoch: int, it: int, shown: dict, extras: dict, bar) -> None:
    recipe = run.recipe
    step = epoch * run.iters + it
    imgs = recipe.batch_size * shown["n"] / max(shown["s"], 1e-9)
    share = min(1.0, shown["data"] / max(shown["s"], 1e-9))
    lr = max(run.schedule.lrs())
    eta = (time.perf_counter() - run.t_train) / max(run.steps_run, 1) * (run.iters * recipe.max_epoch - step - 1)
    loss = run.result.last_loss
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{imgs:.0f}", lr=f"{lr:.2e}")
    LOGGER.info("[%d/%d] it %d/%d | loss %.4f | lr %.3e | %.1f img/s | data wait %.0f%% | eta %s%s",
                epoch + 1, recipe.max_epoch, it + 1, run.iters, loss, lr, imgs, 100 * share, _fmt_time(eta),
                "".join(f" | {k} {v:.4f}" for k, v in extras.items()))
    if run.tb:
        for name, value in (("train/loss", loss), ("train/lr", lr), ("train/img_per_s", imgs),
                            ("train/data_wait_share", share), ("compute/pflop", run.compute.total_flops / 1e15)):
            run.tb.add_scalar(name, value, step)
        for k, v in extras.items():
            run.tb.add_scalar(f"train/{k}", v, step)


def _mid_epoch_checkpoint(run: Run, epoch: int, it: int, stop: bool) -> None:
    state = checkpoint_state(run, epoch, it + 1, run.epoch_rng)
    with rank_agreement(run.env, "checkpoint"):  # a full disk on rank 0 stops every rank: none waits in a barrier
        if run.env.is_main:
            save_checkpoint(state, run.ckpt_file)
            run.result.checkpoint = str(run.ckpt_file)
            LOGGER.info("epoch %d, iteration %d: checkpoint %s", epoch + 1, it + 1, run.ckpt_file)
    run.stopper.saved()
    if stop:
        raise Stopped(run.stopper.message(epoch + 1, it + 1, run.ckpt_file))


def _finish(run: Run, t_start: float) -> RunResult:
    result = run.result
    result.seconds = time.time() - t_start
    result.compute = run.compute.state_dict()
    LOGGER.info("compute: %s", run.compute.summary())
    loss = f"last loss {result.last_loss:.4f}" if math.isfinite(result.last_loss) else "no loss measured"
    LOGGER.info("done: %d epochs, %s, %s, checkpoint %s", result.epochs_done, loss, _fmt_time(result.seconds),
                result.checkpoint)
    return result


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGHUP / SIGQUIT (what schedulers and torchrun send before preempting a job) and SIGINT
    ask the run to stop with a checkpoint at the next read of the flags (every print_interval steps, or sooner
    when steps are slow: about STOP_CHECK_SECONDS apart); `interval_minutes` asks for a checkpoint that often.
    Handlers are installed only in the main thread and put back on `close()`."""

    SIGNALS = STOP_SIGNALS  # TERM, USR1, INT, HUP, QUIT (what torchrun and SLURM send; engine/dist.py)

    def __init__(self, interval_minutes: Optional[float] = None):
        self.received: Optional[int] = None
        self.interval = None if interval_minutes is None else 60.0 * interval_minutes
        self.last_save = time.monotonic()
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    @property
    def save_due(self) -> bool:
        return self.interval is not None and time.monotonic() - self.last_save >= self.interval

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def message(self, epoch: int, iteration: int, ckpt) -> str:
        name = signal.Signals(self.received).name if self.received is not None else "a signal to another process"
        where = f"epoch {epoch}, iteration {iteration}" if iteration else f"the end of epoch {epoch}"
        return f"stopped by {name} at {where}; checkpoint {ckpt} saved; continue with --resume"

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _check_arch(ckpt: dict[str, Any], recipe, src) -> None:
    saved, now = ckpt.get("arch"), recipe.arch_record()
    if saved and now and saved != now:
        raise UserError(f"--resume: {src} was written for {saved}, but this run builds {now}; "
                        "use the same encoder_arch and model options, or another exp_name")


def _version() -> str:
    from .. import __version__

    return __version__
