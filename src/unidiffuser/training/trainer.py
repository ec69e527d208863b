"""Training and fine-tuning with the UniDiffuser objective, on one CPU, one GPU or many (accelerate).

    unidiffuser train --config run.toml
    torchrun --nproc_per_node 8 -m unidiffuser.cli train --config run.toml
    accelerate launch --num_processes 8 -m unidiffuser.cli train --config run.toml

Several processes run data-parallel (DDP: nccl on GPUs, gloo on CPUs); ``batch_size`` is the
global batch of one optimizer step, split evenly over processes and accumulation steps. With
``distributed = "fsdp"`` they shard the network, its gradients, optimizer state and EMA instead
(``fsdp.py``); checkpoints, resuming and samples work the same either way.

Randomness. The initial weights come from ``torch.manual_seed(seed)``. Everything drawn while
training, data order, latent noise, timesteps and diffusion noise, is derived from (seed, step,
process, micro-step) with ``data.derive_seed``: a resumed run redraws exactly what the run
without interruption would have drawn, with no generator state to save. What a checkpoint must
carry is the weights, the EMA, the optimizer, the scheduler, the grad scaler and each process's
data cursor (which advances past skipped examples).

Fine-tuning (``init_from``) starts from our checkpoints, the released uvit_v*.pth or a model
directory in any layout (``checkpoint.pretrained_source``); with ``model`` left out the network
takes the architecture stored with those weights. Image-text networks can write sample grids from
the EMA every ``sample_every`` steps, with the components of a model directory (``components``).

Helpers first; ``train(config)`` reads top to bottom, as DiT's train.py does.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ..network import UViT, UViTConfig
from ..objective import unidiffuser_loss
from ..official import load_state_dict_strict
from ..schedule import NoiseSchedule
from .checkpoint import (
    Checkpoint,
    PretrainedSource,
    checkpoint_name,
    describe_difference,
    load_training_state,
    load_weights,
    pretrained_source,
    replace_directory,
    save_checkpoint,
    starting_checkpoint,
)
from .config import TrainConfig
from .data import DataStream, derive_seed, open_source, resume_cursor
from .fsdp import (
    full_optimizer_state,
    full_state_dict,
    gathered_network,
    load_full_optimizer_state,
    shard_network,
)

# Keys whose change makes a resumed run draw other data or noise than the original would have.
ORDER_KEYS = ("data", "batch_size", "grad_accum", "seed")


# ---------------------------------------------------------------------------------------------
# Helpers


def build_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for this launch: mixed precision, accumulation, DDP when launched so."""
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "mixed_precision = 'fp16': needs a CUDA device and none is available; use 'bf16' or 'no' on CPU"
        )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate runs several processes on CPUs (gloo) only when told cpu=True
    cpu = distributed and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
    )


def micro_batch_size(config: TrainConfig, num_processes: int) -> int:
    """Examples per process and forward pass."""
    parts = num_processes * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size = {config.batch_size}: not divisible by {num_processes} processes x grad_accum "
            f"{config.grad_accum} = {parts}; use a multiple of {parts}"
        )
    return config.batch_size // parts


def build_model(config: TrainConfig, model_config: UViTConfig) -> UViT:
    torch.manual_seed(config.seed)
    model = UViT(model_config)
    model.gradient_checkpointing = config.gradient_checkpointing
    if config.compile:
        model.compile_blocks()
    # The data stream already drops non-finite examples; the network's own value checks would
    # synchronise the GPU on every forward. A diverging loss is caught at each log step instead.
    model.check_values = False
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on norms, biases, position embeddings
    (pos_embed, label_pos.*) and embedding tables."""
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if (
                name == "bias"
                or isinstance(module, nn.LayerNorm | nn.Embedding)
                or full == "pos_embed"
                or full.startswith("label_pos.")
            ):
                no_decay.add(full)
    params = dict(model.named_parameters())
    return [
        {"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0},
    ]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: the learning rate of optimizer step k (from 0) is lr * min(1, (k + 1) / W)."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, steps: int) -> float:
    """Warm-up, constant, then a linear decay over the last D of S steps: step k gets (S - k) / D there.

    The last step (k = S - 1) trains at lr / D; a run resumed with more steps moves its decay along.
    """
    decay = 1.0 if decay_steps == 0 else min(1.0, (steps - step) / decay_steps)
    return warmup_factor(step, warmup_steps) * max(decay, 0.0)


def restore_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, lr: float
) -> None:
    """Resume a schedule: the checkpoint's position on this run's learning rate and schedule.

    The checkpoint gives the step reached (``state`` is the scheduler's state dict); the rate,
    warm-up, decay and step count are the resumed run's own, so a changed ``lr``, ``warmup_steps``,
    ``decay_steps`` or ``steps`` applies from the first resumed step. The optimizer's state must be
    loaded first (it carries the checkpoint's rates, which this replaces).
    """
    scheduler.load_state_dict(state)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device | str = "cpu"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # on CUDA the fused kernel updates all parameters in a few launches instead of hundreds
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=config.betas,
        fused=torch.device(device).type == "cuda" or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor, warmup_steps=config.warmup_steps, decay_steps=config.decay_steps, steps=config.steps
        ),
    )
    return optimizer, scheduler


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters(), strict=True)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one batched update, not one kernel each
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


class LossView:
    """What ``unidiffuser_loss`` needs of the network: its config, and a call that goes through
    accelerate's wrapper (DDP gradient sync, autocast) or, for a sharded network that accelerate
    does not wrap, through ``autocast``."""

    def __init__(
        self,
        wrapped: nn.Module,
        config: UViTConfig,
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        self.wrapped = wrapped
        self.config = config
        self.autocast = autocast

    def __call__(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with self.autocast():
            return self.wrapped(inputs, timesteps)


def resolve_architecture(
    config: TrainConfig, start: Checkpoint | None
) -> tuple[UViTConfig, PretrainedSource | None]:
    """The run's architecture, and the weights to fine-tune from (None when resuming or from scratch).

    A resumed run keeps its checkpoint's architecture when ``model`` is left out (``init_from`` is
    not read again). Otherwise ``model`` left out takes the architecture stored with ``init_from``;
    ``model`` given must agree with it.
    """
    if start is not None:
        return (start.model_config if config.model is None else config.model_config()), None
    if not config.init_from:
        return config.model_config(), None
    source = pretrained_source(config.init_from)
    if config.model is None:
        return config.model_config(), source  # the source's, or a ValueError saying it has none
    model_config = config.model_config()
    if source.config is not None and source.config != model_config:
        raise ValueError(
            f"init_from = {config.init_from!r}: {source.description} holds another architecture than "
            f"model = {_shown_model(config.model)} ({describe_difference(source.config, model_config)}); "
            "leave model out to take the architecture of the weights, or set it to match them"
        )
    return model_config, source


def _shown_model(model) -> str:
    return repr(model) if isinstance(model, str) else "{...}"


def load_pretrained(model: UViT, source: PretrainedSource) -> None:
    """Load fine-tuning weights strictly; a mismatch names the missing, unexpected or misshapen keys."""
    try:
        load_state_dict_strict(model, source.load(), f"{source.description} ({source.names} names)")
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"init_from = {str(source.path)!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Sample grids


def is_image_text(model_config: UViTConfig) -> bool:
    """Whether the pipeline can sample this network (groups image and text; img, clip_img, text)."""
    names = {m.name for m in model_config.modalities}
    return {"img", "clip_img", "text"} <= names and set(model_config.groups) == {"image", "text"}


def load_components(path: str, model_config: UViTConfig, device: torch.device):
    """The frozen components of a model directory (any layout) on ``device``, checked against the
    run's network; the directory's own network is not read (samples come from the run's EMA)."""
    from ..loading import load_components as read_components

    try:
        components = read_components(path, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"components = {path!r}: {e}") from None
    theirs = components.network_config
    for name in ("clip_img", "text"):
        if theirs.modality(name).shape != model_config.modality(name).shape:
            raise ValueError(
                f"components = {path!r}: its {name} has shape {theirs.modality(name).shape}, the run's "
                f"network {model_config.modality(name).shape}; give the components the network was built for"
            )
    channels, ours = theirs.modality("img").shape[0], model_config.modality("img").shape[0]
    if channels != ours:
        raise ValueError(
            f"components = {path!r}: its autoencoder has {channels} latent channels, the run's network {ours}"
        )
    return components


@torch.no_grad()
def write_samples(
    ema: UViT,
    components,
    directory: Path,
    *,
    prompts: Sequence[str],
    images: Sequence[str] = (),
    steps: int = 20,
    seed: int = 0,
) -> list[str]:
    """Sample t2i, i2t and joint from the EMA network into ``directory``; returns the file names.

    Files: t2i_grid.png (one picture per prompt, captioned with it), i2t_grid.png and
    i2t_captions.txt (the given pictures, or the t2i pictures, with the captions the network
    gives them), joint_grid.png and joint_captions.txt (len(prompts) pairs), samples.json.

    Args:
        ema: the network to sample (image-text layout).
        components: the autoencoder, encoders and caption decoder (``loading.Components`` or a
            ``UniDiffuser``).
        directory: an existing folder to write into.
        prompts: the text-to-image prompts.
        images: pictures to caption; none: the text-to-image pictures.
        steps: solver steps per sample.
        seed: every task draws its noise from this seed, so grids of different steps compare.
    """
    from ..components.images import make_grid
    from ..pipeline import UniDiffuser

    pipe = UniDiffuser(
        ema,
        components.autoencoder,
        components.image_encoder,
        components.text_encoder,
        components.caption_decoder,
        data_type=components.data_type,
        guidance_scale=components.guidance_scale,
        grid=components.grid,
    )
    prompts = list(prompts)
    t2i = pipe.text_to_image(prompts, steps=steps, seed=seed)
    make_grid(t2i.images, prompts).save(directory / "t2i_grid.png")
    sources = list(images) or t2i.images
    i2t = pipe.image_to_text(sources, steps=steps, seed=seed)
    pictures = [im if not isinstance(im, str) else _picture(im, pipe.default_size) for im in sources]
    make_grid(pictures, i2t.texts).save(directory / "i2t_grid.png")
    (directory / "i2t_captions.txt").write_text("\n".join(i2t.texts) + "\n", encoding="utf-8")
    joint = pipe.joint(len(prompts), steps=steps, seed=seed)
    make_grid(joint.images, joint.texts).save(directory / "joint_grid.png")
    (directory / "joint_captions.txt").write_text("\n".join(joint.texts) + "\n", encoding="utf-8")
    settings = {
        "prompts": prompts,
        "i2t_inputs": list(images) or "the t2i samples",
        "steps": steps,
        "seed": seed,
        "guidance_scale": 7.0,  # the pipeline's default, the released one
    }
    (directory / "samples.json").write_text(json.dumps(settings, indent=2) + "\n")
    return sorted(p.name for p in directory.iterdir())


def _picture(path: str, size: tuple[int, int]):
    from ..components.images import load_image, resize_and_crop

    return resize_and_crop(load_image(path), size)


class SampleWriter:
    """Periodic samples of one run, every ``sample_every`` steps, written by the main process.

    Every process knows when samples are due (a sharded EMA is gathered by all of them); only the
    main process loads the components and writes. Sampling needs an image-text network and
    ``components``; when either is missing, the writer says so once, at the start, and writes
    nothing.
    """

    def __init__(self, config: TrainConfig, model_config: UViTConfig, device: torch.device, log: RunLog):
        self.config = config
        self.every = 0
        self.components = None
        if not config.sample_every:
            return
        if not is_image_text(model_config):
            log.note(
                f"samples: sample_every = {config.sample_every}, but this network is not the image-text "
                "layout (img, clip_img, text) the pipeline samples; no samples are written"
            )
            return
        if not config.components:
            log.note(
                f"samples: sample_every = {config.sample_every}, but no components are given (a model "
                "directory with the autoencoder, CLIP encoders and caption decoder); no samples are written"
            )
            return
        missing = [p for p in config.sample_images if not Path(p).is_file()]
        if missing:
            raise ValueError(f"sample_images: no such file: {missing}")
        for path in config.sample_images:  # read now, not at the first sample steps later
            try:
                with Image.open(path) as picture:
                    picture.convert("RGB")
            except Exception as err:
                raise ValueError(
                    f"sample_images: cannot read {path} as an image ({err}); give picture files"
                ) from None
        self.every = config.sample_every
        if log.enabled:
            self.components = load_components(config.components, model_config, device)
            log.note(f"samples: every {self.every} steps with the components of {config.components}")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, ema: UViT, step: int, run_dir: Path) -> Path:
        """Write run_dir/samples/step_N/ atomically (a temporary folder, then a rename)."""
        root = run_dir / "samples"
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{checkpoint_name(step)}.tmp-", dir=root))
        try:
            write_samples(
                ema,
                self.components,
                tmp,
                prompts=self.config.sample_prompts,
                images=self.config.sample_images,
                steps=self.config.sample_steps,
                seed=self.config.seed,
            )
            replace_directory(tmp, root / checkpoint_name(step))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return root / checkpoint_name(step)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RunLog:
    """The main process's log: console lines (through tqdm), log.jsonl, TensorBoard if installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.tensorboard = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "log.jsonl", "a")  # closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.note("TensorBoard not installed (pip install tensorboard): logging to log.jsonl only")

    def note(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for k, v in values.items():
                self.tensorboard.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.bar is not None:
                self.bar.close()


def format_metrics(step: int, steps: int, m: Mapping[str, float]) -> str:
    parts = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith("loss/"))
    line = f"step {step}/{steps}  loss {m['loss']:.4f} ({parts})  lr {m['lr']:.2e}  grad {m['grad_norm']:.3f}"
    line += f"  {m['samples_per_s']:.1f} samples/s"
    if "gpu_mem_gib" in m:
        line += f"  mem {m['gpu_mem_gib']:.2f} GiB"
    skipped = {k.split("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("skipped/") and v}
    if skipped:
        line += "  skipped: " + ", ".join(f"{v} {k}" for k, v in skipped.items())
    return line


def check_resume(checkpoint, config: TrainConfig, model_config: UViTConfig, log: RunLog) -> None:
    """Refuse another architecture; say which changed options make the run differ from the original."""
    if checkpoint.model_config != model_config:
        raise ValueError(
            f"resume: {checkpoint.path} holds another architecture than model = {_shown_model(config.model)} "
            f"({describe_difference(checkpoint.model_config, model_config)}); resume with the run's own "
            "config (its config.toml) or start a new output_dir"
        )
    saved, now = checkpoint.state.get("config", {}), config.to_dict()
    defaults = TrainConfig().to_dict()  # keys added since the checkpoint was saved had these values
    changed = [k for k in now if k not in ("resume",) and saved.get(k, defaults[k]) != now[k]]
    if changed:
        order = [k for k in changed if k in ORDER_KEYS]
        log.note(f"resume: options changed since the checkpoint: {', '.join(changed)}")
        if order:
            log.note(f"resume: {', '.join(order)} changed, so data and noise differ from the original run")


@dataclass
class TrainResult:
    """What a finished run leaves: the networks (unwrapped, on the training device; with FSDP,
    plain networks of the gathered weights on the CPU of every process) and where."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    model: UViT
    ema: UViT
    skipped: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The training loop


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune, or resume) a UniDiffuser network as ``config`` says."""
    accelerator = build_accelerator(config)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    micro = micro_batch_size(config, world)
    run_dir = Path(config.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    log = RunLog(run_dir, enabled=is_main)

    # Where to start: the newest complete checkpoint (resume), given weights (init_from), or random.
    start = starting_checkpoint(ckpt_dir, resume=config.resume, output_dir=config.output_dir, note=log.note)
    if config.resume and start is None:
        log.note(f"resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
    model_config, pretrained = resolve_architecture(config, start)
    config.check_loss_weights(model_config)
    if is_main:  # the resolved options of this launch, beside its checkpoints
        _write_text(run_dir / "config.toml", config.to_toml())
        resolved = {
            "train": config.to_dict(),
            "model_config": model_config.to_dict(),
            "processes": world,
            "micro_batch_size": micro,
            "versions": {"torch": torch.__version__},
        }
        _write_text(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")

    # Networks, optimizer and data.
    model = build_model(config, model_config)
    if start is not None:
        check_resume(start, config, model_config, log)
        model.load_state_dict(load_weights(start, "model"))
    elif pretrained is not None:
        load_pretrained(model, pretrained)
        log.note(f"fine-tuning from {pretrained.description} ({config.init_from})")
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if start is not None:
        ema.load_state_dict(load_weights(start, "ema"))
    sharded = config.distributed == "fsdp" and world > 1
    if config.distributed == "fsdp" and not sharded:
        log.note("distributed = 'fsdp' with one process: nothing to shard; training unsharded")
    if sharded:  # before the optimizer, which must hold the sharded parameters
        shard_network(model, device, config.mixed_precision)
        shard_network(ema, device)
    optimizer, scheduler = build_optimizer(model, config, accelerator.device)
    began = time.perf_counter()
    source = open_source(config.data, model_config, config.seed, in_memory=config.data_in_memory)
    for path, reason in source.bad_shards:
        log.note(f"skipping shard {Path(path).name}: {reason}")
    if config.data_in_memory:
        log.note(
            f"data in memory: {source.nbytes / 2**20:,.0f} MiB read in {time.perf_counter() - began:.1f} s"
        )
    stream = DataStream(
        source,
        micro,
        seed=config.seed,
        rank=rank,
        world_size=world,
        num_workers=config.num_workers,
        latent_device=device,
    )

    if sharded:  # FSDP does what accelerate's DDP wrapper would; autocast is LossView's
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        ema.to(device)
    step = 0
    if start is not None:
        training = load_training_state(start)
        if sharded:
            load_full_optimizer_state(optimizer, training["optimizer"])
        else:
            optimizer.load_state_dict(training["optimizer"])
        restore_schedule(optimizer, scheduler, training["scheduler"], config.lr)
        if accelerator.scaler is not None and training.get("scaler"):
            accelerator.scaler.load_state_dict(training["scaler"])
        cursor, exact = resume_cursor(training["data"]["cursors"], rank, world)
        stream.cursor = cursor
        if not exact:
            log.note(
                f"resume: saved with {len(training['data']['cursors'])} processes, now {world}: the "
                "data order continues approximately"
            )
        step = start.step
        log.note(f"resumed from {start.path} at step {step}")

    n_params = sum(p.numel() for p in ema.parameters())
    size = "unbounded" if source.size is None else f"{source.size:,}"
    how = " (FSDP)" if sharded else ""
    log.note(
        f"{n_params:,} parameters | {world} process(es) on {device}{how} | batch {config.batch_size} = "
        f"{world} x {config.grad_accum} x {micro} | data {config.data} ({size} examples) | "
        f"mixed precision {config.mixed_precision}"
    )

    samples = SampleWriter(config, model_config, device, log)
    schedule = NoiseSchedule()
    network = LossView(model, model_config, accelerator.autocast if sharded else contextlib.nullcontext)
    generator = torch.Generator(device=device)
    names = [m.name for m in model_config.diffused]
    window = torch.zeros(len(names) + 2, device=device)  # loss, per-modality losses, micro-steps
    grad_norm = torch.zeros((), device=device)
    window_start, window_steps = time.perf_counter(), 0
    last_checkpoint = start.path if start is not None else None  # a finished run resumed stays there
    if is_main:
        log.bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    model.train()
    while step < config.steps:
        for micro_step in range(config.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in stream.next_batch().items()}
            generator.manual_seed(derive_seed(config.seed, "loss", step, rank, micro_step))
            with accelerator.accumulate(model):
                loss, parts = unidiffuser_loss(
                    network,
                    schedule,
                    batch,
                    weighting=config.weighting,
                    weights=config.loss_weights,
                    generator=generator,
                    clean_prob=config.clean_prob,
                    snr_gamma=config.snr_gamma,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window += torch.stack(
                [loss.detach().float(), *(parts[n].float() for n in names), window.new_ones(())]
            )
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the step
            scheduler.step()
        update_ema(ema, accelerator.unwrap_model(model), config.ema_decay)
        step += 1
        window_steps += 1
        if log.bar is not None:
            log.bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            skipped = torch.tensor(
                [stream.skipped["non_finite"], stream.skipped["unreadable"]],
                device=device,
                dtype=torch.float32,
            )
            totals = accelerator.reduce(torch.cat([window, skipped]), reduction="sum")
            elapsed = time.perf_counter() - window_start
            mean = totals[: len(names) + 1] / totals[len(names) + 1]
            metrics = {"loss": mean[0].item()}
            metrics.update({f"loss/{n}": mean[i + 1].item() for i, n in enumerate(names)})
            metrics["lr"] = scheduler.get_last_lr()[0]
            # whole already where accelerate reduces it (1.16 returns a plain tensor for FSDP2); older
            # versions return torch's DTensor; before the first clipped step it is the plain zero above
            whole = grad_norm.full_tensor() if sharded and hasattr(grad_norm, "full_tensor") else grad_norm
            metrics["grad_norm"] = float(whole)
            metrics["samples_per_s"] = config.batch_size * window_steps / elapsed
            if device.type == "cuda":
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            metrics["skipped/non_finite"] = totals[-2].item()
            metrics["skipped/unreadable"] = totals[-1].item()
            metrics["skipped/shards"] = len(source.bad_shards)
            log.metrics(step, metrics)
            log.note(format_metrics(step, config.steps, metrics))
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"the loss is {metrics['loss']} at step {step}; lower lr, raise warmup_steps or "
                    "use bf16 instead of fp16, and resume from the last checkpoint"
                )
            window.zero_()
            window_start, window_steps = time.perf_counter(), 0

        if step % config.checkpoint_every == 0 or step == config.steps:
            last_checkpoint = save(
                accelerator, config, model_config, step, model, ema, optimizer, scheduler, stream, sharded
            )
            if is_main:
                log.note(f"saved {last_checkpoint}")
        if samples.due(step):
            began = time.perf_counter()
            # a sharded EMA is gathered by every process, for the main one
            whole = gathered_network(ema, model_config, keep=is_main) if sharded else ema
            if is_main:
                written = samples(whole.to(device).eval(), step, run_dir)
                log.note(f"samples: wrote {written} in {time.perf_counter() - began:.1f} s")
            del whole
            window_start += time.perf_counter() - began  # not counted against training throughput

    skipped = {"non_finite": stream.skipped["non_finite"], "unreadable": stream.skipped["unreadable"]}
    skipped["shards"] = len(source.bad_shards)
    stream.close()
    log.close()
    if sharded:  # plain networks of the gathered weights (every process takes part)
        model = gathered_network(model, model_config)
        ema = gathered_network(ema, model_config).requires_grad_(False).eval()
    else:
        model = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, step, last_checkpoint, model, ema, skipped)


def save(
    accelerator: Accelerator,
    config: TrainConfig,
    model_config: UViTConfig,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    stream: DataStream,
    sharded: bool = False,
) -> Path:
    """Write a checkpoint on the main process (every process takes part: the data cursors and,
    when sharded, the full weights, EMA and optimizer state)."""
    cursors = gather_object([stream.cursor])
    skipped: collections.Counter[str] = collections.Counter()
    for counts in gather_object([dict(stream.skipped)]):
        skipped.update(counts)
    path = Path(config.output_dir) / "checkpoints" / checkpoint_name(step)
    if sharded:  # gathered by every process, kept by the main one
        keep = accelerator.is_main_process
        weights, ema_weights = full_state_dict(model, keep), full_state_dict(ema, keep)
        optimizer_state = full_optimizer_state(optimizer, keep)
    else:
        weights, ema_weights = accelerator.unwrap_model(model).state_dict(), ema.state_dict()
        optimizer_state = optimizer.state_dict()
    error = None
    if accelerator.is_main_process:
        try:
            training = {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "data": {"cursors": cursors},
                "step": step,
            }
            state = {
                "config": config.to_dict(),
                "model_config": model_config.to_dict(),
                "data": {"cursors": cursors, "world_size": accelerator.num_processes},
                "skipped_since_launch": dict(skipped),
            }
            save_checkpoint(
                path.parent,
                step,
                model=weights,
                ema=ema_weights,
                training=training,
                state=state,
                keep_last=config.keep_last,
            )
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
    ok = accelerator.gather(torch.tensor([int(error is None)], device=accelerator.device))
    if error is not None:
        raise error
    if not bool(ok.all()):
        raise RuntimeError(f"step {step}: the main process failed to write its checkpoint")
    return path
