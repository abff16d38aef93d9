"""The training run: epochs with a progress bar, metrics per epoch, checkpoints and exact resume.

Resuming is exact on the CPU: the checkpoint written after epoch e holds everything the next epoch reads (model,
optimizer with PILoT's factors and momenta, LR and alpha schedules, the global torch RNG that drives the data
augmentation, the train loader's shuffling generator), saved at the epoch boundary, so a run stopped after epoch e
and resumed ends with bit-identical weights to one that never stopped.

Under torchrun (:mod:`pilot.train.distributed`) each rank trains on its part of every global batch through
DistributedDataParallel (or, with --fsdp, its shard of the model: :mod:`pilot.train.fsdp`), the ranks' sums are
reduced before anything is decided or recorded, rank 0 alone writes (under --fsdp every rank writes its shards of
the checkpoint), and the checkpoint holds every rank's RNG state (restored when resuming with as many ranks).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from pilot.data.sharding import steps_per_epoch
from pilot.evaluate import autocast, evaluate_splits
from pilot.iterative import IterativePruning
from pilot.pruning import named_prunable_weights, sparsity_report
from pilot.schedule import effective_density

from .config import Config
from .distributed import SINGLE, Distributed
from .fsdp import ShardedCheckpoint
from .methods import Method, make_method, make_optimizer, starting_strengths
from .run_data import Data
from .rundir import (CHECKPOINT, METRICS, SHARDED_CHECKPOINT, RunError, append_jsonl, read_checkpoint, save_torch,
                     write_jsonl)

log = logging.getLogger("pilot.train")

CHECKPOINT_FORMAT = 1
# Progress-bar statistics are refreshed this many times per epoch (each refresh waits for the device).
BAR_UPDATES_PER_EPOCH = 20
# A diverged epoch is retried from the last checkpoint with the learning rate times RECOVERY_LR_FACTOR, at most
# MAX_RECOVERIES times in a run; the next divergence ends the run with the error.
RECOVERY_LR_FACTOR = 0.5
MAX_RECOVERIES = 2
# A training loss above this many times that of a uniform guess (ln of the number of classes), averaged over the
# steps since the last progress refresh, counts as diverged as a nan does: such a blow-up does not come back
# before the epoch's checkpoint would keep it (LeNet-300-100 at lr 0.3 reached a loss of 66,000 in its first
# epoch on 2,000 Fashion-MNIST images in batches of 64, and nan in its second).
DIVERGED_LOSS_FACTOR = 10.0


class TrainingDiverged(RunError):
    """The loss became nan or infinite."""


@dataclass
class Progress:
    """What the run has done so far; saved in the checkpoint."""

    cycle: int = 0
    epoch: int = 0  # epochs done in the cycle
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    initial_l1: Optional[float] = None
    # One record per diverged epoch retried with a lower learning rate: epoch, cycle, error, lr_factor (cumulative)
    recoveries: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- RNG state

# Only torch's generators: the augmentation (torchvision v2) and the shuffling draw from them; nothing in a run
# uses Python's or numpy's global RNG (DataLoader workers derive theirs from the loader's generator). The loader's
# generator is the same on every rank; the global one is each rank's own (see augmentation_seed).

def _local_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _rng_state(loader: DataLoader, place: Distributed) -> Optional[dict[str, Any]]:
    """The RNG states to checkpoint, on rank 0 (None on the others): a single process's as they always were, a
    distributed run's with every rank's global state under "ranks"."""
    ranks = place.gather_object(_local_rng_state())
    if ranks is None:
        return None
    if not place.enabled:
        return {**ranks[0], "loader": loader.generator.get_state()}
    return {"ranks": ranks, "loader": loader.generator.get_state()}


def augmentation_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of ``rank``'s global RNG (its augmentation) in a distributed run, after the model is initialised
    alike on every rank: distinct for every (seed, rank, epoch of a resume), so the ranks do not crop and flip in
    lockstep."""
    return ((seed << 32) + (rank << 16) + epoch) % 2 ** 64  # torch.manual_seed takes 64 bits


def _set_rng_state(state: dict[str, Any], loader: DataLoader, place: Distributed, *, seed: int, epoch: int) -> None:
    loader.generator.set_state(state["loader"])
    ranks = state.get("ranks", [state])
    if len(ranks) != place.world_size:
        # The shuffling continues exactly (the loader's generator is shared); the augmentation cannot, since the
        # checkpoint has no RNG state for this rank: it is seeded afresh.
        log.warning("the checkpoint holds the RNG states of %d process(es), this run has %d: the data order "
                    "continues exactly, the random augmentation is seeded afresh", len(ranks), place.world_size)
        torch.manual_seed(augmentation_seed(seed, place.rank, epoch))
        return
    local = ranks[place.rank]
    torch.set_rng_state(local["torch"])
    if local["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(local["cuda"])


# ---------------------------------------------------------------------------------------------- epochs

def density(model: nn.Module) -> float:
    """Fraction of non-zero entries among the prunable weights."""
    return 1.0 - sparsity_report(model).sparsity


def prunable_effective_density(model: nn.Module) -> float:
    """:func:`pilot.schedule.effective_density` of the prunable weights (STR's as thresholded)."""
    return effective_density(layer for _, layer in named_prunable_weights(model))


def train_one_epoch(method: Method, loader: DataLoader, *, device: torch.device,
                    autocast_dtype: Optional[torch.dtype], bar: tqdm, label_smoothing: float = 0.0,
                    memory_format: torch.memory_format = torch.preserve_format,
                    network: Optional[nn.Module] = None, place: Distributed = SINGLE) -> tuple[float, float]:
    """One pass over ``loader`` (one optimizer and LR-schedule step per batch); returns (mean loss, accuracy) over
    all ranks. ``network`` is what runs forward and backward: ``method.model`` (also when it is sharded with
    --fsdp) or its DistributedDataParallel, either compiled with --compile-model."""
    model, optimizer = method.model, method.optimizer
    network = model if network is None else network
    network.train()
    # Running sums stay on the device; reading them (a sync) happens only when the bar is refreshed.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    refresh_every = max(1, len(loader) // BAR_UPDATES_PER_EPOCH)
    window_start = (0.0, 0)  # the global loss sum and examples at the last refresh
    for step, (inputs, targets) in enumerate(loader, start=1):
        inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            logits = network(inputs)
        if place.enabled:
            # DDP (and FSDP's reduce-scatter) average the ranks' gradients; scaled by ranks / global batch, each
            # rank's summed loss makes that average the gradient of the mean over the global batch, also when its
            # final batch splits unevenly.
            summed = nn.functional.cross_entropy(logits.float(), targets, reduction="sum",
                                                 label_smoothing=label_smoothing)
            loss = summed * (place.world_size / loader.batch_sampler.global_size(step - 1))
            loss_sum += summed.detach()
        else:
            loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
            loss_sum += loss.detach() * targets.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_step()
        optimizer.step()
        method.lr_schedule.step()
        batch_correct = (logits.detach().argmax(dim=1) == targets).sum()
        correct += batch_correct
        seen += targets.shape[0]
        if method.steps_alpha:  # Algorithm 1 on every rank sees the accuracy of the whole global batch
            hits, examples = place.all_reduce_sum([batch_correct.item(), targets.shape[0]], device)
            method.end_step(hits / examples)
        else:
            method.end_step()
        bar.update()
        if step % refresh_every == 0 or step == len(loader):
            # Over all ranks, so that every rank sees a divergence at the same step (and recovers with the others)
            loss_total, seen_total = place.all_reduce_sum([loss_sum.item(), seen], device)
            mean_loss = loss_total / seen_total
            window_loss = (loss_total - window_start[0]) / (seen_total - window_start[1])
            window_start = (loss_total, seen_total)
            limit = DIVERGED_LOSS_FACTOR * math.log(logits.shape[1])
            if not math.isfinite(window_loss) or window_loss > limit:
                what = f"became {window_loss}" if not math.isfinite(window_loss) else \
                    f"rose to {window_loss:.4g}, over {DIVERGED_LOSS_FACTOR:g}x that of a uniform guess"
                raise TrainingDiverged(f"the training loss {what} (step {step} of the epoch); lower --lr"
                                       + (" or --alpha" if method.factorised else ""))
            postfix = {"loss": f"{mean_loss:.4f}", "acc": f"{correct.item() / seen:.2%}",
                       "density": f"{density(model):.2%}"}
            if method.alpha() is not None:
                postfix["alpha"] = f"{method.alpha():.3g}"
            bar.set_postfix(postfix, refresh=False)
    loss_total, correct_total, seen_total = place.all_reduce_sum([loss_sum.item(), correct.item(), seen], device)
    return loss_total / seen_total, correct_total / seen_total



def format_record(record: dict[str, Any], config: Config) -> str:
    """The log line of an epoch."""
    parts = [f"epoch {record['epoch']}/{config.epochs * (config.cycles + 1)}"]
    if config.cycles:
        parts.append(f"cycle {record['cycle']}/{config.cycles}")
    parts.append(f"lr {record['lr']:.4g}")
    if record.get("alpha") is not None:
        parts.append(f"alpha {record['alpha']:.3g}")
    parts.append(f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}")
    for split in ("val", "test"):
        if f"{split}_loss" in record:
            parts.append(f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_accuracy']:.2%}")
    parts.append(f"density {record['density']:.2%}")
    parts.append(f"eff. density {record['effective_density']:.3f}")
    if "planned_density" in record:
        parts.append(f"plan {record['planned_density']:.3f} strength {record['strength']:.3g}")
    if "l1_relative" in record:
        parts.append(f"L1 {record['l1_relative']:.3f}x")
    parts.append(f"sum lr*reg {record['regularisation_integral']:.3g}")
    parts.append(f"{record['seconds']:.1f}s (+{record['eval_seconds']:.1f}s eval)")
    return "  ".join(parts)


def _snapshot(method: Method) -> dict[str, Any]:
    """Copies of the model's and the optimizer's state (their state dicts hold live tensors)."""
    return copy.deepcopy({"model": method.model.state_dict(), "optimizer": method.optimizer.state_dict()})


class Trainer:
    """Runs the epochs of every cycle through :class:`pilot.IterativePruning` (one cycle without --cycles).

    Resuming a run stopped in cycle k replays the pruning driver up to cycle k without training: cycles before
    k - 1 return at once, cycle k - 1 loads the state it ended with (kept in the checkpoint as ``cycle_end``), so
    the driver prunes and rewinds exactly as it did before the stop; cycle k then loads the checkpoint and goes on.
    """

    def __init__(self, config: Config, data: Data, model: nn.Module, place: Distributed = SINGLE) -> None:
        self.config, self.data, self.place = config, data, place
        self.out = Path(config.out)
        self.device = torch.device(config.device)
        self.autocast_dtype = torch.bfloat16 if config.bf16 else None
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.network: Optional[nn.Module] = None  # built once the optimizer has set the weights
        # The strengths a target starts from depend on the steps of the run (the config saved keeps the integral).
        started = starting_strengths(config, len(data.train))
        self.iterative = IterativePruning(model, lambda m: make_optimizer(started, m), mode=config.rewind,
                                          keep_rate=1.0 - config.prune_rate, scope=config.prune_scope)
        self.progress = Progress()
        self.cycle_end: Optional[dict[str, Any]] = None
        self.sharded_checkpoint = ShardedCheckpoint(self.out / SHARDED_CHECKPOINT, place) if config.fsdp else None
        # The checkpoint to resume from (of a sharded one, the part that is not the model's and the optimizer's)
        self.checkpoint: Optional[dict[str, Any]] = None
        if config.resume and self.sharded_checkpoint is not None:
            self.checkpoint = self.sharded_checkpoint.read_trainer_state()
        elif config.resume:
            # Rank 0 reads the checkpoint and sends it to the others: the run directory need not be on a shared disk.
            self.checkpoint = place.from_main(lambda: read_checkpoint(self.out))
        if self.checkpoint is not None:
            if self.checkpoint.get("format") != CHECKPOINT_FORMAT:
                raise RunError(f"checkpoint format {self.checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT} "
                               "(written by another version of pilot.train); pass --overwrite to start over")
            check_world_size(config, model, len(data.train.dataset), self.checkpoint.get("world_size", 1),
                             place.world_size)
            self.progress = Progress(**self.checkpoint["progress"])
            self.cycle_end = self.checkpoint["cycle_end"]
            self.iterative.rewind_point = self.checkpoint["rewind_point"]
            log.info("resuming %s after epoch %d of cycle %d", self.out, self.progress.epoch, self.progress.cycle)
        elif config.resume:
            log.info("%s has no checkpoint yet: starting from epoch 1", self.out)
        # Records written after the checkpoint (a crash between the two writes) go with their unsaved epoch.
        if place.is_main:
            write_jsonl(self.progress.history, self.out / METRICS)
        self.method: Optional[Method] = None

    def run(self) -> Method:
        """Train every cycle; returns the method of the last one (its model is the trained model)."""
        self.iterative.run(self.train_cycle, self.config.cycles)
        assert self.method is not None
        return self.method

    def train_cycle(self, model: nn.Module, optimizer: Optimizer, cycle: int) -> None:
        config = self.config
        method = self.method = make_method(config, model, optimizer, len(self.data.train))
        if self.checkpoint is not None and cycle < self.progress.cycle:  # replay, see the class docstring
            if cycle == self.progress.cycle - 1:
                model.load_state_dict(self.cycle_end["model"])
                optimizer.load_state_dict(self.cycle_end["optimizer"])
            return
        if self.checkpoint is not None:
            self._load(method, self.checkpoint, cycle)
            self.checkpoint = None
        else:
            self.progress.cycle, self.progress.epoch = cycle, 0
            self.progress.initial_l1 = method.l1_norm()
            self.save_checkpoint(method)  # where a divergence in the cycle's first epoch goes back to
        if self.network is None:
            # After the optimizer is built (FusedPILoTSGD rounds the weights to m0 * w0) and the checkpoint loaded:
            # DDP registers its gradient hooks on these parameter tensors, which pruning and rewinding only edit.
            self.network = self._network(model)
        for epoch in range(self.progress.epoch + 1, config.epochs + 1):
            self.train_epoch_recovering(method, cycle, epoch)
            if config.rewind == "wr" and cycle == 0 and epoch == config.rewind_epoch:
                self.iterative.save_rewind_point()
            self.save_checkpoint(method)
        if cycle < config.cycles:
            self.cycle_end = _snapshot(method)

    def _load(self, method: Method, checkpoint: dict[str, Any], cycle: int) -> None:
        """Set the model, the optimizer, the schedules and the RNG states to ``checkpoint``'s (of a sharded one,
        the part that is not the model's and the optimizer's, which are read from the shards)."""
        if self.sharded_checkpoint is not None:
            self.sharded_checkpoint.load(method.model, method.optimizer)
            method.load_schedules_state_dict(checkpoint["method"])
        else:
            method.model.load_state_dict(checkpoint["model"])
            method.load_state_dict(checkpoint["method"])  # after the model: FusedPILoTSGD sets x = m * w
        _set_rng_state(checkpoint["rng"], self.data.train, self.place, seed=self.config.seed,
                       epoch=cycle * self.config.epochs + self.progress.epoch)

    def train_epoch_recovering(self, method: Method, cycle: int, epoch: int) -> None:
        """:meth:`train_epoch`; if its loss diverges, go back to the last checkpoint (the end of the previous
        epoch, or the start of the cycle), multiply the learning rate by :data:`RECOVERY_LR_FACTOR` for the rest
        of the run and train the epoch again. The run keeps what it learnt before the divergence; the retried
        epoch sees the same batches. After :data:`MAX_RECOVERIES` such retries the next divergence ends the run."""
        while True:
            try:
                self.train_epoch(method, cycle, epoch)
                return
            except TrainingDiverged as error:
                if len(self.progress.recoveries) >= MAX_RECOVERIES:
                    raise TrainingDiverged(f"{error} (the run had gone back to its last checkpoint {MAX_RECOVERIES} "
                                           f"times, each time with the learning rate x{RECOVERY_LR_FACTOR:g})") \
                        from None
                checkpoint = self.sharded_checkpoint.read_trainer_state() if self.sharded_checkpoint is not None \
                    else self.place.from_main(lambda: read_checkpoint(self.out))
                self._load(method, checkpoint, cycle)
                method.scale_lr(RECOVERY_LR_FACTOR)
                lr_factor = RECOVERY_LR_FACTOR ** (len(self.progress.recoveries) + 1)
                self.progress.recoveries.append({"epoch": cycle * self.config.epochs + epoch, "cycle": cycle,
                                                 "error": str(error), "lr_factor": lr_factor})
                log.warning("epoch %d diverged (%s): back to the checkpoint after epoch %d, training on with the "
                            "learning rate x%g", cycle * self.config.epochs + epoch, error, self.progress.epoch,
                            lr_factor)

    def _network(self, model: nn.Module) -> nn.Module:
        """What runs the training forward and backward: ``model``, or its DistributedDataParallel in a distributed
        run without --fsdp; torch.compile'd with --compile-model. Checkpoints, evaluation and pruning use ``model``
        itself, so state dict keys never carry a wrapper's prefix."""
        network = model
        if self.place.enabled and not self.config.fsdp:
            network = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        return torch.compile(network) if self.config.compile_model else network

    def train_epoch(self, method: Method, cycle: int, epoch: int) -> None:
        """One epoch, its evaluation, the alpha schedule's step, its log line and metrics record."""
        config = self.config
        global_epoch = cycle * config.epochs + epoch
        record: dict[str, Any] = {"epoch": global_epoch, "cycle": cycle,
                                  "lr": method.optimizer.param_groups[0]["lr"], "alpha": method.alpha()}
        started = time.perf_counter()
        with tqdm(total=len(self.data.train), desc=f"epoch {global_epoch}/{config.epochs * (config.cycles + 1)}",
                  unit="batch", leave=False, disable=not (config.progress and self.place.is_main),
                  dynamic_ncols=True) as bar:
            record["train_loss"], record["train_accuracy"] = train_one_epoch(
                method, self.data.train, device=self.device, autocast_dtype=self.autocast_dtype, bar=bar,
                label_smoothing=config.label_smoothing, memory_format=self.memory_format, network=self.network,
                place=self.place)
        record["seconds"] = time.perf_counter() - started
        # Each rank updated its BatchNorm statistics with its own batches: from here on all hold rank 0's.
        self.place.broadcast_buffers(method.model)
        started = time.perf_counter()
        record.update(self.place.reduce_metrics(
            evaluate_splits(method.model, self.data.eval, device=self.device, autocast_dtype=self.autocast_dtype),
            self.data.eval, self.device))
        record["eval_seconds"] = time.perf_counter() - started
        record["density"] = density(method.model)
        record["effective_density"] = prunable_effective_density(method.model)
        record["regularisation_integral"] = method.regularisation_integral
        if method.target is not None:
            record["planned_density"] = method.target.course.density(method.target.k)
            record["strength"] = method.strength()
        l1 = method.l1_norm()
        if l1 is not None:
            record["l1_norm"] = l1
            record["l1_relative"] = l1 / self.progress.initial_l1 if self.progress.initial_l1 else math.nan
        method.end_epoch(record["train_accuracy"])
        self.progress.epoch = epoch
        self.progress.history.append(record)
        self.progress.train_seconds += record["seconds"]
        self.progress.eval_seconds += record["eval_seconds"]
        log.info(format_record(record, config))
        if self.place.is_main:
            append_jsonl(record, self.out / METRICS)

    def save_checkpoint(self, method: Method) -> None:
        rng = _rng_state(self.data.train, self.place)  # every rank takes part in gathering the RNG states
        if self.sharded_checkpoint is not None:  # every rank writes its shards of the model and the optimizer
            trainer_state = self._trainer_state(rng, method.schedules_state_dict()) if self.place.is_main else None
            self.sharded_checkpoint.save(method.model, method.optimizer, trainer_state)
        elif self.place.is_main:
            save_torch({**self._trainer_state(rng, method.state_dict()), "model": method.model.state_dict()},
                       self.out / CHECKPOINT)

    def _trainer_state(self, rng: Optional[dict[str, Any]], method_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint but for the model's state."""
        state = {"format": CHECKPOINT_FORMAT, "method": method_state, "progress": dataclasses.asdict(self.progress),
                 "rng": rng, "cycle_end": self.cycle_end,
                 "rewind_point": self.iterative.rewind_point if self.config.rewind == "wr" else None}
        if self.place.enabled:  # single-process checkpoints stay as they were (world size 1 is implied)
            state["world_size"] = self.place.world_size
        return state


def check_world_size(config: Config, model: nn.Module, train_size: int, saved: int, current: int) -> None:
    """Resuming with another number of processes is sound when the computation does not depend on it. The global
    batches are the same (see :mod:`pilot.data.sharding`) except for a small final batch, which more processes
    drop (and the schedules count steps per epoch); and BatchNorm takes its statistics over the global batch with
    one process or --sync-bn, else over each process's part."""
    if saved == current:
        return
    steps = {world: steps_per_epoch(train_size, config.batch_size, world) for world in (saved, current)}
    if steps[saved] != steps[current]:
        raise RunError(f"--resume: this run trained {steps[saved]} steps per epoch with {saved} process(es); with "
                       f"{current} the final batch of {train_size % config.batch_size} examples is too small to give "
                       f"each process two, so an epoch would have {steps[current]} steps. Resume with {saved} "
                       "process(es)")
    def norm_batch(world_size: int) -> int:
        return config.batch_size if world_size == 1 or config.sync_bn else config.batch_size // world_size
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_norm and norm_batch(saved) != norm_batch(current):
        raise RunError(f"--resume: this run trained with {saved} process(es), whose BatchNorm statistics were taken "
                       f"over batches of {norm_batch(saved)}; with {current} they would be taken over "
                       f"{norm_batch(current)}, a different training. Resume with {saved} process(es) (a run "
                       "trained with --sync-bn, or without BatchNorm, resumes with any number)")
    log.info("resuming a run of %d process(es) with %d: the global batches are the same", saved, current)
