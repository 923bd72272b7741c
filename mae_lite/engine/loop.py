"""The one training loop: every method (a network wrapped to return `(loss, logs)`) trains here."""
from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..errors import NonFiniteLoss, Stopped, UserError
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .compute import Compute, flop_counter
from .dist import DistEnv, all_reduce_mean, barrier
from .evaluate import eval_loader
from .log import LOGGER, close_logging, setup_logging

CKPT_NAME = "last_epoch_ckpt.pth.tar"
BEST_NAME = "last_epoch_best_ckpt.pth.tar"


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


def seed_everything(seed: Optional[int], rank: int) -> None:
    if seed is None:
        return
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_loader(dataset, batch: int, env: DistEnv, workers: int, train: bool, collate_fn=None) -> DataLoader:
    """Workers are not persistent: fresh ones each epoch draw their seeds from the main random stream,
    which --resume restores, so a resumed run sees the same crops as an uninterrupted one."""
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=train, drop_last=train) if env.distributed else None
    return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=env.device.type == "cuda", drop_last=train,
                      persistent_workers=False, collate_fn=collate_fn)


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors anywhere in a batch (a tensor, two views, a list of detection targets) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    return (f"{d}d " if d else "") + f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def train(recipe, env: DistEnv, *, resume: Optional[str] = None, init_ckpt: Optional[str] = None,
          amp: bool = False, resume_requested: bool = False) -> RunResult:
    """Train `recipe` in this process (one rank of `env`). `resume_requested` with `resume=None` means `--resume`."""
    t_start = time.time()
    out = recipe.output_path
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)
    log_path = setup_logging(out, env.rank)
    try:
        return _train(recipe, env, out, resume, init_ckpt, amp, resume_requested, t_start, log_path)
    finally:
        close_logging()


def _train(recipe, env, out, resume, init_ckpt, amp, resume_requested, t_start, log_path) -> RunResult:
    LOGGER.info("mae-lite %s | torch %s | device %s | world size %d | log %s", _version(), torch.__version__,
                env.device, env.world_size, log_path)
    LOGGER.info("%s", recipe.config_table())
    seed_everything(recipe.seed, env.rank)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))  # processes sharing this machine
    if env.device.type == "cpu" and local_procs > 1:
        torch.set_num_threads(max(1, cpu_cores() // local_procs))

    # ----- data ----------------------------------------------------------------------------------
    if recipe.batch_size % env.world_size:
        raise UserError(f"-b {recipe.batch_size} is not divisible by the {env.world_size} processes; "
                        f"use a multiple of {env.world_size}")
    per_proc = recipe.batch_size // env.world_size
    datasets = recipe.build_datasets()
    train_ds = datasets["train"]
    if len(train_ds) < recipe.batch_size:
        raise UserError(f"the training set has {len(train_ds)} images, fewer than one batch (-b {recipe.batch_size}); "
                        "lower -b")
    workers = min(recipe.num_workers, cpu_cores() // local_procs)
    collate = recipe.collate_fn()
    loader = make_loader(train_ds, per_proc, env, workers, train=True, collate_fn=collate)
    iters = len(loader)
    val_loader = (eval_loader(datasets["eval"], per_proc, env, workers, collate_fn=collate)
                  if datasets.get("eval") is not None else None)

    # ----- model, optimiser, schedule, precision ------------------------------------------------
    model = recipe.build_model().to(env.device)
    optimizer = recipe.build_optimizer(model)
    schedule = recipe.build_schedule(optimizer, iters)
    amp_dtype = torch.float16 if env.device.type == "cuda" else torch.bfloat16
    if amp and env.device.type == "cpu":
        LOGGER.info("--amp on CPU: bfloat16 autocast (no GradScaler); without AMX it is slower than fp32")
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp and env.device.type == "cuda")
    primary = recipe.primary_metric
    start_epoch, best = 0, {f"best_{primary}": 0.0, f"best_{primary}_epoch": -1}

    ckpt_file = out / CKPT_NAME
    resumed_compute, skip, mid_epoch_rng = None, 0, (None, None)
    if resume_requested:
        src = checkpoint_path(out, resume)
        if not src.is_file():
            raise UserError(f"--resume: no checkpoint at {src}; run without --resume to start, or give the file")
        ckpt = load_checkpoint(src)
        _check_arch(ckpt, recipe, src)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"--resume: {src} does not match this recipe's model/optimizer "
                            f"({str(e).splitlines()[0][:160]})") from None
        schedule.load_state_dict(ckpt.get("scheduler", {}))
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["start_epoch"])
        best = {k: v for k, v in ckpt.items() if k.startswith("best_")} or best
        resumed_compute = ckpt.get("compute")
        skip = int(ckpt.get("iteration", 0))
        if skip:  # a mid-epoch checkpoint: replay the epoch's data order, then continue from the saved state
            if ckpt.get("iters_per_epoch") != iters:
                raise UserError(f"--resume: {src} was saved in the middle of an epoch of {ckpt.get('iters_per_epoch')} "
                                f"iterations, but this run has {iters} per epoch; resume with the same -b, data and "
                                "processes")
            mid_epoch_rng = (ckpt.get("epoch_rng"), ckpt.get("rng"))
        else:
            restore_rng_state(ckpt.get("rng"), env)
        LOGGER.info("resumed from %s at epoch %d%s", src, start_epoch,
                    f", iteration {skip} of epoch {start_epoch + 1}" if skip else "")
    else:
        summary = recipe.load_initial_weights(model, init_ckpt)
        if summary:
            LOGGER.info("initial weights from %s", summary)
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    method = unwrap(model)

    vis_images = _visual_batch(recipe, train_ds) if env.is_main and hasattr(method, "save_visuals") else None
    tb = None
    if env.is_main and recipe.enable_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / f"tb_train-{time.strftime('%Y-%m-%d-%H-%M-%S')}"))

    result = RunResult(epochs_done=start_epoch, checkpoint=str(ckpt_file) if ckpt_file.is_file() else None)
    total_steps = iters * recipe.max_epoch
    LOGGER.info("training %d epochs x %d iterations, %d images per step (%d per process), lr %.3g",
                recipe.max_epoch - start_epoch, iters, recipe.batch_size, per_proc, recipe.scaled_lr)
    if recipe.warmup_epochs > recipe.max_epoch:
        LOGGER.info("notice: warmup_epochs (%d) > max_epoch (%d): the learning rate only ramps up in this run",
                       recipe.warmup_epochs, recipe.max_epoch)
    compute = Compute.from_state(resumed_compute)
    compute.device = env.device.type
    stopper = StopSignals(recipe.ckpt_interval_minutes)
    t_train = time.perf_counter()
    steps_run = 0
    try:
        for epoch in range(start_epoch, recipe.max_epoch):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            model.train()
            bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{recipe.max_epoch}", disable=not env.is_main,
                       dynamic_ncols=True, leave=False)
            win = {"data": 0.0, "total": 0.0, "n": 0}
            epoch_wait = {"data": 0.0, "total": 0.0}
            if skip:
                restore_rng_state(mid_epoch_rng[0], env)  # the state this epoch's data order was drawn from
                LOGGER.info("replaying the data order of epoch %d: skipping its first %d batches", epoch + 1, skip)
                bar.update(skip)
            epoch_rng = local_rng_state(env)
            t_prev = time.perf_counter()
            for it, batch in enumerate(loader):
                if it < skip:  # trained on before the checkpoint: loaded, so that every random stream advances
                    if it == skip - 1:  # as it did, but not used; then the saved state takes over
                        restore_rng_state(mid_epoch_rng[1], env)
                        skip, t_prev = 0, time.perf_counter()
                    continue
                t_data = time.perf_counter()
                step = epoch * iters + it
                schedule.step(step)
                images, target = recipe.device_batch(batch, env.device)
                if hasattr(method, "set_progress"):  # methods with per-step schedules of their own (MoCo momentum)
                    method.set_progress(step, total_steps)
                with ExitStack() as counting:  # the run's first step also counts its FLOPs
                    counter = counting.enter_context(flop_counter()) if compute.flops_per_image is None else None
                    with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp):
                        loss, logs = model(images, target)
                    loss_avg, stop_now, save_now = _sync_step(loss, stopper, env)
                    if not math.isfinite(loss_avg.item()):
                        raise NonFiniteLoss(
                            f"loss is {loss_avg.item()} at epoch {epoch + 1}, iteration {it}: training stopped; "
                            f"the last checkpoint ({result.checkpoint or 'none written yet'}) is intact. Lower lr, "
                            "set clip_grad=1.0 or drop --amp, then continue with --resume")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                if counter is not None:
                    compute.flops_per_image = counter.get_total_flops() / per_proc
                if recipe.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    if recipe.clip_mode == "value":
                        torch.nn.utils.clip_grad_value_(model.parameters(), recipe.clip_grad)
                    else:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                t_now = time.perf_counter()
                win["data"] += t_data - t_prev
                win["total"] += t_now - t_prev
                win["n"] += 1
                compute.add(recipe.batch_size, t_now - t_prev, env.world_size)
                if it > 0:  # the first batch waits for the workers to start, whatever their speed
                    epoch_wait["data"] += t_data - t_prev
                    epoch_wait["total"] += t_now - t_prev
                t_prev = t_now
                steps_run += 1
                result.last_loss = loss_avg.item()
                bar.update(1)
                if (it + 1) % recipe.print_interval == 0 or it + 1 == iters:
                    imgs = recipe.batch_size * win["n"] / max(win["total"], 1e-9)
                    share = win["data"] / max(win["total"], 1e-9)
                    lr = max(schedule.lrs())
                    eta = (time.perf_counter() - t_train) / steps_run * (total_steps - step - 1)
                    extras = {k: all_reduce_mean(v.detach().float(), env).item() if torch.is_tensor(v) else float(v)
                              for k, v in logs.items()}
                    bar.set_postfix(loss=f"{result.last_loss:.4f}", img_s=f"{imgs:.0f}", lr=f"{lr:.2e}")
                    LOGGER.info("[%d/%d] it %d/%d | loss %.4f | lr %.3e | %.1f img/s | data wait %.0f%% | eta %s%s",
                                epoch + 1, recipe.max_epoch, it + 1, iters, result.last_loss, lr, imgs, 100 * share,
                                _fmt_time(eta), "".join(f" | {k} {v:.4f}" for k, v in extras.items()))
                    if tb:
                        tb.add_scalar("train/loss", result.last_loss, step)
                        tb.add_scalar("train/lr", lr, step)
                        tb.add_scalar("train/img_per_s", imgs, step)
                        tb.add_scalar("train/data_wait_share", share, step)
                        tb.add_scalar("compute/pflop", compute.total_flops / 1e15, step)
                        for k, v in extras.items():
                            tb.add_scalar(f"train/{k}", v, step)
                    win = {"data": 0.0, "total": 0.0, "n": 0}
                if (stop_now or save_now) and it + 1 < iters:  # mid-epoch; at the epoch's end the normal save runs
                    state = _state(env, epoch, it + 1, iters, epoch_rng, method, optimizer, schedule, scaler, best,
                                   recipe, compute)
                    if env.is_main:
                        save_checkpoint(state, ckpt_file)
                        result.checkpoint = str(ckpt_file)
                        LOGGER.info("epoch %d, iteration %d: checkpoint %s", epoch + 1, it + 1, ckpt_file)
                    stopper.saved()
                    barrier(env)
                    if stop_now:
                        raise Stopped(stopper.message(epoch + 1, it + 1, ckpt_file))
            bar.close()
            _warn_slow_loader(epoch_wait, epoch + 1, workers)
            data_report = recipe.data_report(env)  # e.g. skipped bad images; may stop the run
            if data_report:
                LOGGER.info("epoch %d: data %s", epoch + 1, data_report)
            result.epochs_done = epoch + 1
            last = epoch + 1 == recipe.max_epoch
            is_best = False
            if val_loader is not None and ((epoch + 1) % recipe.eval_interval == 0 or last):
                metrics = recipe.evaluate(method, val_loader, env, amp)
                value = metrics[primary]
                is_best = best.get(f"best_{primary}_epoch", -1) < 0 or value > best[f"best_{primary}"]
                if is_best:
                    best = {**{f"best_{k}": v for k, v in metrics.items()}, f"best_{primary}_epoch": epoch + 1}
                result.metrics = metrics
                result.top1, result.top5 = metrics.get("top1"), metrics.get("top5")
                shown = ", ".join(f"{_title(k)}: {v:.3f}" for k, v in metrics.items())
                LOGGER.info("epoch %d: %s (best %s %.3f at epoch %d)", epoch + 1, shown, _title(primary),
                            best[f"best_{primary}"], best[f"best_{primary}_epoch"])
                if tb:
                    for k, v in metrics.items():
                        tb.add_scalar(f"Val/{_title(k)}", v, (epoch + 1) * iters)
            stop_here = stop_now and not last  # a signal during the epoch's last iteration
            save = is_best or (epoch + 1) % recipe.dump_interval == 0 or last or stop_here or save_now
            if save:
                state = _state(env, epoch + 1, 0, iters, None, method, optimizer, schedule, scaler, best, recipe,
                               compute)  # collective: every rank takes part
                stopper.saved()
            if env.is_main and save:
                save_checkpoint(state, ckpt_file)
                result.checkpoint = str(ckpt_file)
                LOGGER.info("epoch %d: checkpoint %s", epoch + 1, ckpt_file)
                if is_best:
                    save_checkpoint(state, out / BEST_NAME)
                if vis_images is not None:
                    png = method.save_visuals(vis_images.to(env.device), out / f"reconstruction_ep{epoch + 1:04d}.png",
                                              recipe.mean, recipe.std)
                    result.visuals.append(str(png))
                    LOGGER.info("epoch %d: reconstructions %s", epoch + 1, png)
            barrier(env)
            if stop_here:
                raise Stopped(stopper.message(epoch + 1, 0, ckpt_file))
    finally:
        stopper.close()
        if tb:
            tb.close()
    result.seconds = time.time() - t_start
    result.compute = compute.state_dict()
    LOGGER.info("compute: %s", compute.summary())
    LOGGER.info("done: %d epochs, last loss %.4f, %s, checkpoint %s", result.epochs_done, result.last_loss,
                _fmt_time(result.seconds), result.checkpoint)
    return result


SLOW_LOADER_SHARE = 0.3


def _warn_slow_loader(wait: dict[str, float], epoch: int, workers: int) -> None:
    """Say so when waiting for data took a large share of an epoch's steps: the GPUs (or cores) sat idle."""
    share = wait["data"] / wait["total"] if wait["total"] > 0 else 0.0
    if share > SLOW_LOADER_SHARE:
        LOGGER.info("notice: epoch %d spent %.0f%% of its step time waiting for data (%d loader workers per process): "
                    "raise num_workers if cores are free, keep the data on a local disk, or pre-resize the images",
                    epoch, 100 * share, workers)


class StopSignals:
    """SIGTERM / SIGUSR1 (what schedulers send before preempting a job) and SIGINT ask the run to stop after
    the current step with a checkpoint; `interval_minutes` asks for a checkpoint that often, mid-epoch too.
    Handlers are installed only in the main thread and put back on `close()`."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n))

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


def _sync_step(loss: torch.Tensor, stopper: StopSignals, env: DistEnv) -> tuple[torch.Tensor, bool, bool]:
    """The mean loss over processes, and whether any process was asked to stop / has a checkpoint due: one
    all-reduce, so every rank takes the same decision at the same step."""
    local = [float(stopper.received is not None), float(stopper.save_due)]
    vec = torch.cat([loss.detach().float().reshape(1), torch.tensor(local, device=loss.device)])
    if env.distributed:
        torch.distributed.all_reduce(vec)
        vec[0] /= env.world_size
    return vec[0], bool(vec[1] > 0), bool(vec[2] > 0)


def _state(env: DistEnv, start_epoch: int, iteration: int, iters: int, epoch_rng, method, optimizer, schedule, scaler,
           best: dict, recipe, compute: Compute) -> Optional[dict[str, Any]]:
    """The checkpoint (the original's keys plus ours) on the main process, None on the others. `iteration` > 0
    marks a mid-epoch checkpoint: that many iterations of epoch `start_epoch` are done, and `epoch_rng` holds
    the random state its data order came from. Collective (random states of every rank): every rank calls it."""
    rng = gather_rng_states(env)
    extra = {"epoch_rng": gather_rng_states(env, epoch_rng)} if iteration else {}
    if not env.is_main:
        return None
    return {"rng": rng, "start_epoch": start_epoch, "iteration": iteration, "iters_per_epoch": iters,
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(), **best, "arch": recipe.arch_record(), "recipe": recipe.name,
            "config": recipe.to_dict(), "compute": compute.state_dict(), **extra}


def local_rng_state(env: DistEnv) -> dict[str, Any]:
    own = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(env.device)
    return own


def gather_rng_states(env: DistEnv, own: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Every rank's random state (torch, CUDA, Python; this moment's unless `own` is given), so a resumed run
    continues the same random streams."""
    own = own if own is not None else local_rng_state(env)
    if not env.distributed:
        return [own]
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, own)
    return states


def restore_rng_state(states: Optional[list[dict[str, Any]]], env: DistEnv) -> None:
    if not states or len(states) != env.world_size:
        return  # another world size: keep the fresh seeds
    own = states[env.rank]
    torch.set_rng_state(own["torch"])
    random.setstate(_as_tuple(own["python"]))
    if "cuda" in own and env.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], env.device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _visual_batch(recipe, dataset) -> Optional[torch.Tensor]:
    """A fixed set of images (same crops every time) to draw reconstructions of."""
    n = min(getattr(recipe, "vis_images", 0), len(dataset))
    if n <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_state = random.getstate()
        random.seed(0)
        images = torch.stack([dataset[i][0] for i in range(n)])
        random.setstate(random_state)
    return images


def _check_arch(ckpt: dict[str, Any], recipe, src) -> None:
    saved, now = ckpt.get("arch"), recipe.arch_record()
    if saved and now and saved != now:
        raise UserError(f"--resume: {src} was written for {saved}, but this run builds {now}; "
                        "use the same encoder_arch and model options, or another exp_name")


def _title(metric: str) -> str:
    """`top1` -> `Top1` (the original's log spelling); other metric names as they are."""
    return metric[0].upper() + metric[1:] if metric.startswith("top") else metric


def _version() -> str:
    from .. import __version__

    return __version__
