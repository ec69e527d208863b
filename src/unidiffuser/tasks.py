"""Tasks as timestep settings, and classifier-free guidance as a wrapper of the model function.

A task gives every timestep group one role:

| role     | timestep        | input                          |
|----------|-----------------|--------------------------------|
| generate | runs 1 -> 0     | the solver's state             |
| given    | 0               | the clean condition            |
| absent   | 1 (network T)   | fresh Gaussian noise each call |

t2i, i2t, joint, i and t are presets of this one mechanism for the image-text layout; i2t2i and
t2i2t chain two tasks, passing the generated latents straight on. Any number of groups works the
same way.

Guidance (no extra training): eps = (1 + s) eps_cond - s eps_uncond. With given groups, the
unconditional pass makes them absent ("uncond") or feeds a supplied empty-condition value at t = 0
("empty"). Without given groups and with several generated ones (joint), each generated group's
unconditional term is its prediction with the other generated groups absent. All passes of one
solver step go through the network as one batched call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from math import prod

import torch
from torch import Tensor

from .fast import FastNetwork
from .network import Modality, UViT
from .schedule import NoiseSchedule
from .solvers import Callback, sample

ROLES = ("generate", "given", "absent")
GUIDANCE_MODES = ("uncond", "empty")


@dataclass(frozen=True)
class Task:
    """The role of every timestep group, as sorted (group, role) pairs."""

    name: str
    roles: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for group, role in self.roles:
            if role not in ROLES:
                raise ValueError(
                    f"task {self.name!r}: group {group!r} has role {role!r}, expected one of {ROLES}"
                )
        if not self.generated:
            raise ValueError(f"task {self.name!r}: no group is generated")

    @classmethod
    def of(cls, name: str, **roles: str) -> Task:
        return cls(name, tuple(sorted(roles.items())))

    def role(self, group: str) -> str:
        return dict(self.roles)[group]

    def groups_with(self, role: str) -> tuple[str, ...]:
        return tuple(g for g, r in self.roles if r == role)

    @property
    def generated(self) -> tuple[str, ...]:
        return self.groups_with("generate")

    @property
    def given(self) -> tuple[str, ...]:
        return self.groups_with("given")


# The image-text presets (groups "image" and "text"); chains pass latents from one task to the next.
TASKS: dict[str, Task] = {
    "t2i": Task.of("t2i", image="generate", text="given"),
    "i2t": Task.of("i2t", image="given", text="generate"),
    "joint": Task.of("joint", image="generate", text="generate"),
    "i": Task.of("i", image="generate", text="absent"),
    "t": Task.of("t", image="absent", text="generate"),
}
CHAINS: dict[str, tuple[str, ...]] = {"i2t2i": ("i2t", "t2i"), "t2i2t": ("t2i", "i2t")}
MODES = (*TASKS, *CHAINS)


class StateLayout:
    """Flattens a dict of per-modality tensors into one (B, N) solver state, and back."""

    def __init__(self, modalities: Sequence[Modality], shapes: Mapping[str, tuple[int, ...]]):
        self.names = [m.name for m in modalities]
        self.shapes = {n: tuple(shapes[n]) for n in self.names}
        self.sizes = [prod(self.shapes[n]) for n in self.names]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def pack(self, values: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([values[n].reshape(values[n].shape[0], -1) for n in self.names], dim=1)  # (B, N)

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        parts = torch.split(x, self.sizes, dim=1)
        return {n: p.reshape(x.shape[0], *self.shapes[n]) for n, p in zip(self.names, parts, strict=True)}


def _noise(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> Tensor:
    """Gaussian noise drawn on the generator's device (the CPU by default), then moved."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        # From pinned memory the copy is asynchronous; from pageable memory it would wait for
        # the GPU to finish its queue, once per solver step.
        return noise.pin_memory().to(device, dtype, non_blocking=True)
    return noise.to(device, dtype)


class NoiseTape:
    """The absent modalities' noise of a whole sampling run, drawn ahead into one buffer.

    A loop captured as a CUDA graph cannot draw from a CPU generator at each step, so it reads
    its noise from here: ``next`` hands out the draws in order, call after call, and ``fill``
    draws all of them for the next run, piece by piece in the order the plain loop draws them, so
    the same generator gives both the same numbers.

    Args:
        shapes: the shapes one model call draws, in order.
        calls: model calls per run.
        device: where the model reads the noise.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], calls: int, device):
        if calls < 1:
            raise ValueError(f"calls={calls}: expected at least one model call")
        self.shapes, self.calls = [tuple(s) for s in shapes], calls
        self.offsets = list(accumulate([prod(s) for s in self.shapes] * calls, initial=0))
        self.buffer = torch.zeros(self.offsets[-1], device=device)  # the noise the model reads
        self._host: Tensor | None = None  # pinned staging memory for CPU draws to a GPU
        self._copied: torch.cuda.Event | None = None
        self.cursor = 0

    def rewind(self) -> None:
        self.cursor = 0

    def next(self, shape: tuple[int, ...]) -> Tensor:
        draws = len(self.offsets) - 1
        if self.cursor >= draws:
            raise RuntimeError(f"noise tape: the loop drew more than the {draws} draws of {self.calls} calls")
        expected = self.shapes[self.cursor % len(self.shapes)]
        if tuple(shape) != expected:
            raise RuntimeError(
                f"noise tape: draw {self.cursor} has shape {tuple(shape)}, expected {expected}"
            )
        start, end = self.offsets[self.cursor], self.offsets[self.cursor + 1]
        self.cursor += 1
        return self.buffer[start:end].view(shape)

    def check_spent(self) -> None:
        """Raises unless the run drew exactly what the tape holds (its calls times the draws of one call)."""
        if self.shapes and self.cursor != len(self.offsets) - 1:
            raise RuntimeError(
                f"noise tape: the loop made {self.cursor / len(self.shapes):g} model calls, "
                f"the tape was made for {self.calls}"
            )

    def fill(self, generator: torch.Generator | None) -> None:
        """Draws the noise of one run from ``generator`` (on its device, the CPU by default)."""
        if not self.shapes:
            return
        gen_device = generator.device if generator is not None else torch.device("cpu")
        pieces = [
            torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).reshape(-1)
            for _ in range(self.calls)
            for shape in self.shapes
        ]
        if gen_device.type != "cpu" or self.buffer.device.type == "cpu":  # no host staging needed
            self.buffer.copy_(torch.cat(pieces))
            return
        if self._host is None:
            self._host = torch.empty(self.buffer.shape, pin_memory=self.buffer.device.type == "cuda")
        if self._copied is not None:
            self._copied.synchronize()  # the previous run's copy has left the staging memory
        torch.cat(pieces, out=self._host)
        self.buffer.copy_(self._host, non_blocking=True)
        if self.buffer.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()


def _shape(m: Modality, sizes: Mapping[str, tuple[int, int]] | None) -> tuple[int, ...]:
    if m.kind == "image" and sizes and m.name in sizes:
        h, w = sizes[m.name]
        if h % m.patch_size or w % m.patch_size or h < 1 or w < 1:
            raise ValueError(
                f"sizes[{m.name!r}]={sizes[m.name]}: expected positive multiples of {m.patch_size}"
            )
        return (m.shape[0], h, w)
    return m.shape


def _batch_values(
    name: str, value: Tensor | float | int, batch: int, shape: tuple[int, ...], device
) -> Tensor:
    """A given value, broadcast to (batch, *shape) on the device."""
    v = torch.as_tensor(value, device=device)
    if tuple(v.shape) == shape:
        v = v.expand(batch, *shape)
    if tuple(v.shape) != (batch, *shape):
        raise ValueError(f"{name}: expected shape {(batch, *shape)} or {shape}, got {tuple(v.shape)}")
    return v


class TaskModel:
    """The model function eps(x, t) of one task, with guidance, for the solvers.

    Args:
        network: the U-ViT, or a ``fast.FastNetwork`` around it (compiled, CUDA graphs, fp8).
        schedule: the noise schedule (gives the network's timestep).
        task: the role of every timestep group.
        given: clean values of every modality of the given groups, (B, ...) each (or one unbatched
            value for all rows).
        batch_size: rows to generate; taken from ``given`` when it holds batched values.
        labels: values of the label modalities (an int or a (B,) tensor), e.g. {"data_type": 1}.
        guidance_scale: s in eps = (1 + s) eps_cond - s eps_uncond; 0 turns guidance off.
        guidance: "uncond" (given groups absent) or "empty" (given groups set to ``empty`` at t=0).
        empty: the empty-condition value of every given modality, for guidance="empty".
        sizes: image sizes (H, W) of generated or absent images other than the trained one.
        generator: the source of all noise (drawn on its device, the CPU by default).
    """

    def __init__(
        self,
        network: UViT | FastNetwork,
        schedule: NoiseSchedule,
        task: Task,
        *,
        given: Mapping[str, Tensor] | None = None,
        batch_size: int | None = None,
        labels: Mapping[str, Tensor | int] | None = None,
        guidance_scale: float = 0.0,
        guidance: str = "uncond",
        empty: Mapping[str, Tensor] | None = None,
        sizes: Mapping[str, tuple[int, int]] | None = None,
        generator: torch.Generator | None = None,
    ):
        cfg = network.config
        given = dict(given or {})
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator={generator!r}: expected a torch.Generator or None (a seed goes in it)"
            )
        self.network, self.schedule, self.task, self.generator = network, schedule, task, generator
        if {g for g, _ in task.roles} != set(cfg.groups):
            raise ValueError(
                f"task {task.name!r} sets groups {sorted(g for g, _ in task.roles)}, but the model's "
                f"groups are {sorted(cfg.groups)}"
            )
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance={guidance!r}: expected one of {GUIDANCE_MODES}")
        if (
            not isinstance(guidance_scale, (int, float))
            or isinstance(guidance_scale, bool)
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale={guidance_scale!r}: expected a finite number")
        self.scale, self.mode = float(guidance_scale), guidance
        self.device, self.dtype = network.device, torch.float32

        need = {m.name for g in task.given for m in cfg.members(g)}
        if set(given) != need:
            raise ValueError(
                f"given: task {task.name!r} needs values for {sorted(need)}, got {sorted(given)}"
            )
        if batch_size is None:
            batched = [
                v
                for n, v in given.items()
                if torch.as_tensor(v).ndim == len(_shape(cfg.modality(n), None)) + 1
            ]
            batch_size = batched[0].shape[0] if batched else None
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1 (or batched given values)")
        self.batch = batch_size

        images = [m.name for m in cfg.diffused if m.kind == "image"]
        stray = sorted(set(sizes or {}) - set(images))
        if stray:
            raise ValueError(f"sizes: {stray} name no image modality; this model's images are {images}")
        self.shapes = {m.name: _shape(m, sizes) for m in cfg.diffused}
        for n, v in given.items():
            v = torch.as_tensor(v)
            m = cfg.modality(n)
            if m.kind == "image" and v.ndim >= 3:  # a given image may come at any size
                self.shapes[n] = tuple(v.shape[-3:])
        self.given = {
            n: _batch_values(f"given[{n!r}]", v, self.batch, self.shapes[n], self.device).to(self.dtype)
            for n, v in given.items()
        }
        for n, v in self.given.items():
            if not torch.isfinite(v).all():
                raise ValueError(f"given[{n!r}]: contains NaN or infinite values")
        self.empty = {}
        if self.scale and guidance == "empty" and task.given:
            if set(empty or {}) != need:
                raise ValueError(
                    f"empty: guidance='empty' needs values for {sorted(need)}, got {sorted(empty or {})}"
                )
            self.empty = {
                n: _batch_values(f"empty[{n!r}]", v, self.batch, self.shapes[n], self.device).to(self.dtype)
                for n, v in empty.items()
            }
        label_mods = cfg.labels
        labels = dict(labels or {})
        if set(labels) != {m.name for m in label_mods}:
            raise ValueError(
                f"labels: this model needs {sorted(m.name for m in label_mods)}, got {sorted(labels)}"
            )
        for m in label_mods:  # class numbers: a float such as 0.5 would be floored without a word
            value = torch.as_tensor(labels[m.name])
            if value.is_floating_point() or value.dtype == torch.bool:
                raise ValueError(f"labels[{m.name!r}]={labels[m.name]!r}: expected whole class numbers")
        self.labels = {
            m.name: _batch_values(f"labels[{m.name!r}]", labels[m.name], self.batch, (), self.device).long()
            for m in label_mods
        }
        self.generated = [m for g in task.generated for m in cfg.members(g)]
        self.layout = StateLayout(self.generated, self.shapes)
        self.noise_tape: NoiseTape | None = None  # where absent noise comes from in a captured loop

    # -- as the graph of a captured loop sees it ------------------------------------------------

    def signature(self) -> tuple:
        """What a captured loop of this model function depends on besides the solver's grid."""
        values = tuple(
            (kind, name, tuple(v.shape), v.dtype)
            for kind, group in (("given", self.given), ("empty", self.empty), ("labels", self.labels))
            for name, v in sorted(group.items())
        )
        return (self.task, self.scale, self.mode, self.batch, values, tuple(sorted(self.shapes.items())))

    def _absent_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the noise one call draws, in the order it draws them."""
        cfg = self.network.config
        return [
            (self.batch, *self.shapes[m.name])
            for roles in self._passes()
            for g in cfg.groups
            if roles[g] == "absent"
            for m in cfg.members(g)
        ]

    def with_noise_tape(self, calls: int) -> TaskModel:
        """A twin whose conditions are its own buffers and whose absent noise comes from a
        ``NoiseTape`` of ``calls`` calls: the model function a captured loop runs."""
        twin = copy.copy(self)
        twin.given = {n: v.contiguous().clone() for n, v in self.given.items()}
        twin.empty = {n: v.contiguous().clone() for n, v in self.empty.items()}
        twin.labels = {n: v.contiguous().clone() for n, v in self.labels.items()}
        twin.noise_tape = NoiseTape(self._absent_shapes(), calls, self.device)
        return twin

    def load_conditions(self, other: TaskModel) -> None:
        """Copies another call's conditions (same signature) into this one's buffers."""
        for mine, theirs in (
            (self.given, other.given),
            (self.empty, other.empty),
            (self.labels, other.labels),
        ):
            for name, buffer in mine.items():
                buffer.copy_(theirs[name])

    # -- the passes of one step -----------------------------------------------------------------

    def _passes(self) -> list[dict[str, str]]:
        """Group roles of each network pass: first the conditional one, then the unconditional."""
        cond = {g: r for g, r in self.task.roles}
        if not self.scale:
            return [cond]
        if self.task.given:
            swap = "empty" if self.mode == "empty" else "absent"
            return [cond, {g: (swap if r == "given" else r) for g, r in cond.items()}]
        gen = self.task.generated
        if len(gen) == 1:
            return [cond]  # nothing to guide on: plain unconditional sampling
        return [cond] + [
            {g: ("absent" if g in gen and g != keep else r) for g, r in cond.items()} for keep in gen
        ]

    def __call__(self, x: Tensor, t: float) -> Tensor:
        cfg = self.network.config
        b = self.batch
        current = self.layout.unpack(x.to(self.device, self.dtype))
        passes = self._passes()
        time_of = {"generate": t, "given": 0.0, "empty": 0.0, "absent": 1.0}
        inputs: dict[str, list[Tensor]] = {m.name: [] for m in cfg.modalities}
        times: dict[str, list[Tensor]] = {g: [] for g in cfg.groups}
        for roles in passes:
            for g in cfg.groups:
                role = roles[g]
                times[g].append(torch.full((b,), time_of[role], dtype=torch.float32, device=self.device))
                for m in cfg.members(g):
                    if role == "generate":
                        v = current[m.name]
                    elif role == "given":
                        v = self.given[m.name]
                    elif role == "empty":
                        v = self.empty[m.name]
                    elif self.noise_tape is not None:  # absent, in a captured loop
                        v = self.noise_tape.next((b, *self.shapes[m.name]))
                    else:  # absent: fresh noise at every call
                        v = _noise((b, *self.shapes[m.name]), self.generator, self.device, self.dtype)
                    inputs[m.name].append(v)
            for m in cfg.labels:
                inputs[m.name].append(self.labels[m.name])
        out = self.network(
            {n: torch.cat(v) for n, v in inputs.items()},
            {g: self.schedule.network_time(torch.cat(v)) for g, v in times.items()},  # 0..1 -> 0..T
        )
        eps = {}
        for m in self.generated:
            chunks = out[m.name].float().split(b)
            cond = chunks[0]
            if len(passes) == 1:
                eps[m.name] = cond
                continue
            # the unconditional term of this modality: the pass that keeps its group generated
            uncond = next(chunks[i] for i, roles in enumerate(passes[1:], 1) if roles[m.group] == "generate")
            eps[m.name] = (1 + self.scale) * cond - self.scale * uncond
        return self.layout.pack(eps).to(x.dtype)

    def initial_noise(self) -> Tensor:
        return _noise((self.batch, self.layout.numel), self.generator, self.device, self.dtype)


def generate(
    network: UViT | FastNetwork,
    schedule: NoiseSchedule,
    task: Task | str,
    *,
    given: Mapping[str, Tensor] | None = None,
    batch_size: int | None = None,
    labels: Mapping[str, Tensor | int] | None = None,
    steps: int = 50,
    solver: str = "dpm++2m",
    grid: str = "time",
    guidance_scale: float = 0.0,
    guidance: str = "uncond",
    empty: Mapping[str, Tensor] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
) -> dict[str, Tensor]:
    """Sample the generated groups of one task; returns a tensor per generated modality.

    See ``TaskModel`` for the arguments that define the task and guidance, and
    ``solvers.sample`` for steps, solver and grid. ``x_T`` replaces the initial noise, as the
    flat (B, N) state of the generated modalities in model order.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(
                f"task={task!r}: expected a Task or one of {sorted(TASKS)} (chains: generate_chain)"
            )
        task = TASKS[task]
    fn = TaskModel(
        network, schedule, task, given=given, batch_size=batch_size, labels=labels,
        guidance_scale=guidance_scale, guidance=guidance, empty=empty, sizes=sizes, generator=generator,
    )  # fmt: skip
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r}: expected a function (step, t, state) or None")
    if x_T is None:
        x_T = fn.initial_noise()
    elif not isinstance(x_T, Tensor):
        raise ValueError(
            f"x_T: expected a tensor of shape {(fn.batch, fn.layout.numel)}, got {type(x_T).__name__}"
        )
    elif tuple(x_T.shape) != (fn.batch, fn.layout.numel):
        raise ValueError(f"x_T: expected shape {(fn.batch, fn.layout.numel)}, got {tuple(x_T.shape)}")
    x_T = x_T.to(fn.device, torch.float32)
    with torch.no_grad():
        if callback is None and isinstance(network, FastNetwork) and network.captures_loops:
            # every solver calls the model `steps` times; the loop is captured once per grid
            run = lambda model, x: sample(model, x, schedule, steps=steps, solver=solver, grid=grid)  # noqa: E731
            x = network.sample_loop(fn, x_T, run, key=(schedule, steps, solver, grid), calls=steps)
        else:
            x = sample(fn, x_T, schedule, steps=steps, solver=solver, grid=grid, callback=callback)
    return fn.layout.unpack(x)


def generate_chain(
    network: UViT | FastNetwork,
    schedule: NoiseSchedule,
    tasks: Sequence[Task | str] | str,
    *,
    given: Mapping[str, Tensor] | None = None,
    empty: Mapping[str, Tensor] | None = None,
    on_stage: Callable[[int, dict[str, Tensor]], None] | None = None,
    **kwargs,
) -> dict[str, Tensor]:
    """Run tasks one after another, each stage's generated latents given to the next.

    ``tasks`` is a list of tasks or a chain name ("i2t2i", "t2i2t"). Returns the latest value of
    every modality produced along the way. Other keyword arguments go to ``generate``.
    """
    if isinstance(tasks, str):
        if tasks not in CHAINS:
            raise ValueError(f"tasks={tasks!r}: expected a list of tasks or one of {sorted(CHAINS)}")
        tasks = CHAINS[tasks]
    unknown = [t for t in tasks if isinstance(t, str) and t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: {unknown} are no tasks; use Task objects or names of {sorted(TASKS)}")
    tasks = [TASKS[t] if isinstance(t, str) else t for t in tasks]
    if not tasks:
        raise ValueError("tasks: expected at least one task")
    cfg = network.config
    known = dict(given or {})
    produced: dict[str, Tensor] = {}
    for i, task in enumerate(tasks):
        need = [m.name for g in task.given for m in cfg.members(g)]
        missing = [n for n in need if n not in known]
        if missing:
            raise ValueError(
                f"chain stage {i} ({task.name}) needs {missing}, which no earlier stage produced"
            )
        stage_empty = {n: empty[n] for n in need} if empty else None
        out = generate(
            network, schedule, task, given={n: known[n] for n in need}, empty=stage_empty, **kwargs
        )
        known.update(out)
        produced.update(out)
        if on_stage is not None:
            on_stage(i, out)
    return produced
