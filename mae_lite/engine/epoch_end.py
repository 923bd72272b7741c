"""The end of a training epoch: data report, evaluation (of the model and its EMA), checkpoints, visuals.
Also the checkpoint dict itself, which the mid-epoch checkpoint shares."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import DiskFull, Stopped
from .checkpoint import disk_error, no_space_message, save_checkpoint
from .dist import barrier, rank_agreement
from .log import LOGGER
from .rng import gather_rng_states

BEST_NAME = "last_epoch_best_ckpt.pth.tar"
SLOW_LOADER_SHARE = 0.3


def end_of_epoch(run, epoch: int, stop_now: bool, save_now: bool) -> None:
    """Everything after an epoch's last step, on every rank (evaluation and the checkpoint's random states are
    collective). Raises Stopped when a signal arrived during the epoch's last print window."""
    recipe, env = run.recipe, run.env
    _warn_slow_loader(run.epoch_wait, epoch + 1, run.workers)
    report = recipe.data_report(env)  # e.g. skipped bad images; may stop the run
    if report:
        run.data_report = report
        if any(report.values()):  # all-zero counts (a clean data set) are kept in the checkpoint, not logged
            shown = {k: (list(v)[:5] if k == "bad_image_files" else v) for k, v in report.items()}
            LOGGER.info("epoch %d: data %s", epoch + 1, shown)
    run.result.epochs_done = epoch + 1
    last = epoch + 1 == recipe.max_epoch
    is_best = evaluate_epoch(run, epoch, last)
    stop_here = stop_now and not last
    if not (is_best or (epoch + 1) % recipe.dump_interval == 0 or last or stop_here or save_now):
        barrier(env)
        return
    state = checkpoint_state(run, epoch + 1, 0, None)  # collective: every rank takes part
    run.stopper.saved()
    with rank_agreement(env, "checkpoint"):  # a full disk on rank 0 stops every rank: none waits in a barrier
        if env.is_main:
            save_checkpoint(state, run.ckpt_file)
            run.result.checkpoint = str(run.ckpt_file)
            LOGGER.info("epoch %d: checkpoint %s", epoch + 1, run.ckpt_file)
            if is_best:
                save_checkpoint(state, run.out / BEST_NAME, last_good=run.ckpt_file)
            _save_visuals(run, epoch)
    if stop_here:
        raise Stopped(run.stopper.message(epoch + 1, 0, run.ckpt_file))


def evaluate_epoch(run, epoch: int, last: bool) -> bool:
    """Evaluate the model (and its EMA) when due; keep the best of the two. True when this is the best yet."""
    recipe, env = run.recipe, run.env
    if run.val_loader is None or not ((epoch + 1) % recipe.eval_interval == 0 or last):
        return False
    primary = recipe.primary_metric
    metrics = recipe.evaluate(run.method, run.val_loader, env, run.amp)
    ema_metrics = recipe.evaluate(run.ema.module, run.val_loader, env, run.amp) if run.ema is not None else {}
    winner, from_ema = (ema_metrics, True) if ema_metrics and ema_metrics[primary] > metrics[primary] else (metrics, False)
    is_best = run.best.get(f"best_{primary}_epoch", -1) < 0 or winner[primary] > run.best[f"best_{primary}"]
    if is_best:
        run.best = {**{f"best_{k}": v for k, v in winner.items()}, f"best_{primary}_epoch": epoch + 1}
        if run.ema is not None:
            run.best["best_from_ema"] = from_ema
    result = run.result
    result.metrics, result.metrics_ema = metrics, ema_metrics
    result.top1, result.top5 = metrics.get("top1"), metrics.get("top5")
    shown = ", ".join(f"{_title(k)}: {v:.3f}" for k, v in metrics.items())
    if ema_metrics:
        shown += " | EMA " + ", ".join(f"{_title(k)}: {v:.3f}" for k, v in ema_metrics.items())
    LOGGER.info("epoch %d: %s (best %s %.3f at epoch %d%s)", epoch + 1, shown, _title(primary),
                run.best[f"best_{primary}"], run.best[f"best_{primary}_epoch"],
                ", EMA" if run.best.get("best_from_ema") else "")
    if run.tb:
        step = (epoch + 1) * run.iters
        for k, v in metrics.items():
            run.tb.add_scalar(f"Val/{_title(k)}", v, step)
        for k, v in ema_metrics.items():
            run.tb.add_scalar(f"Val_EMA/{_title(k)}", v, step)
    return is_best


def checkpoint_state(run, start_epoch: int, iteration: int, epoch_rng) -> Optional[dict[str, Any]]:
    """The checkpoint (the original's keys plus ours) on the main process, None on the others. `iteration` > 0
    marks a mid-epoch checkpoint: that many optimizer steps of epoch `start_epoch` are done, and `epoch_rng`
    holds the random state its data order came from. Collective (random states of every rank)."""
    env = run.env
    rng = gather_rng_states(env)
    extra = {"epoch_rng": gather_rng_states(env, epoch_rng)} if iteration else {}
    if not env.is_main:
        return None
    if run.ema is not None:
        extra["model_ema"] = run.ema.module.state_dict()
    if run.data_report:
        extra["data"] = run.data_report
    recipe = run.recipe
    return {"rng": rng, "start_epoch": start_epoch, "iteration": iteration, "iters_per_epoch": run.iters,
            "model": run.method.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.schedule.state_dict(), "scaler": run.precision.scaler.state_dict(), **run.best,
            "arch": recipe.arch_record(), "recipe": recipe.name, "config": recipe.to_dict(),
            "compute": run.compute.state_dict(), "last_loss": float(run.result.last_loss), **extra}


def _save_visuals(run, epoch: int) -> None:
    if run.vis_images is None:
        return
    target = run.out / f"reconstruction_ep{epoch + 1:04d}.png"
    try:
        png = run.method.save_visuals(run.vis_images, target, run.recipe.mean, run.recipe.std)
    except OSError as e:
        reason = disk_error(e)
        if reason is None:
            raise
        raise DiskFull(no_space_message(f"reconstructions {target}", reason, run.out, None, run.ckpt_file)) from None
    run.result.visuals.append(str(png))
    LOGGER.info("epoch %d: reconstructions %s", epoch + 1, png)


def _warn_slow_loader(wait: dict[str, float], epoch: int, workers: int) -> None:
    """Say so when waiting for data took a large share of an epoch's steps: the GPUs (or cores) sat idle."""
    share = wait["data"] / wait["total"] if wait["total"] > 0 else 0.0
    if share > SLOW_LOADER_SHARE:
        LOGGER.info("notice: epoch %d spent %.0f%% of its step time waiting for data (%d loader workers per process): "
                    "raise num_workers if cores are free, keep the data on a local disk, or pre-resize the images",
                    epoch, 100 * share, workers)


def _title(metric: str) -> str:
    """`top1` -> `Top1` (the original's log spelling); other metric names as they are."""
    return metric[0].upper() + metric[1:] if metric.startswith("top") else metric


def visual_batch(recipe, dataset, device: torch.device) -> Optional[Any]:
    """A fixed set of images (same crops every time) to draw reconstructions of, through `recipe.device_batch`."""
    import random

    from torch.utils.data import default_collate

    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None  # a stream (shards): no fixed images to pick
    n = min(getattr(recipe, "vis_images", 0), len(dataset))
    if n <= 0:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_state = random.getstate()
        random.seed(0)
        items = [dataset[i] for i in range(n)]
        random.setstate(random_state)
    batch = (recipe.collate_fn() or default_collate)(items)
    return recipe.device_batch(batch, device)[0]
