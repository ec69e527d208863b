"""Tasks as timestep settings: every mode, guidance as one batched call, and bad arguments."""

import pytest
import torch
from conftest import random_inputs

from unidiffuser.network import UViT, UViTConfig, image, sequence, vector
from unidiffuser.schedule import NoiseSchedule
from unidiffuser.tasks import CHAINS, TASKS, Task, TaskModel, generate, generate_chain

SCHEDULE = NoiseSchedule()
B = 3


def given_for(model, task_name, batch=B):
    inputs, _ = random_inputs(model.config, batch)
    task = TASKS[task_name]
    return {m.name: inputs[m.name] for g in task.given for m in model.config.members(g)}


class Recorder:
    """Forward hook: keeps each network call's inputs and timesteps."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_hook(lambda mod, args, out: self.calls.append(args))


@pytest.mark.parametrize("mode", [*TASKS, *CHAINS])
@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_every_mode_gives_its_shapes(tiny, mode, scale):
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(labels={"data_type": 1}, steps=3, guidance_scale=scale, generator=gen)
    if mode in CHAINS:
        first = TASKS[CHAINS[mode][0]]
        out = generate_chain(tiny, SCHEDULE, mode, given=given_for(tiny, first.name), **kwargs)
        expect = {"img", "clip_img", "text"}
    else:
        given = given_for(tiny, mode)
        out = generate(tiny, SCHEDULE, mode, given=given, batch_size=None if given else B, **kwargs)
        expect = {m.name for g in TASKS[mode].generated for m in tiny.config.members(g)}
    assert set(out) == expect
    shapes = {"img": (B, 4, 8, 8), "clip_img": (B, 16), "text": (B, 8, 8)}
    for name, v in out.items():
        assert v.shape == shapes[name] and torch.isfinite(v).all()


def test_task_roles_are_the_papers_timesteps():
    assert TASKS["t2i"].roles == (("image", "generate"), ("text", "given"))
    assert TASKS["i"].roles == (("image", "generate"), ("text", "absent"))
    assert TASKS["joint"].generated == ("image", "text") and TASKS["joint"].given == ()
    assert CHAINS == {"i2t2i": ("i2t", "t2i"), "t2i2t": ("t2i", "i2t")}


def test_timesteps_fed_to_the_network(tiny):
    rec = Recorder(tiny)
    fn = TaskModel(tiny, SCHEDULE, TASKS["t2i"], given=given_for(tiny, "t2i"), labels={"data_type": 0})
    fn(fn.initial_noise(), 0.25)
    ((_, times),) = rec.calls
    assert torch.equal(times["image"], torch.full((B,), 250.0))  # generated: 1000 t
    assert torch.equal(times["text"], torch.zeros(B))  # given: t = 0
    fn = TaskModel(tiny, SCHEDULE, TASKS["i"], batch_size=B, labels={"data_type": 0})
    fn(fn.initial_noise(), 0.5)
    assert torch.equal(rec.calls[-1][1]["text"], torch.full((B,), 1000.0))  # absent: t = T


def test_guidance_scale_zero_is_the_plain_conditional(tiny):
    given = given_for(tiny, "t2i")
    fn = TaskModel(tiny, SCHEDULE, TASKS["t2i"], given=given, labels={"data_type": 1}, guidance_scale=0.0)
    x = fn.initial_noise()
    eps = fn.layout.unpack(fn(x, 0.6))
    state = fn.layout.unpack(x)
    direct = tiny(
        {**given, **state, "data_type": torch.ones(B, dtype=torch.long)},
        {"image": torch.full((B,), 600.0), "text": torch.zeros(B)},
    )
    for name in eps:
        torch.testing.assert_close(eps[name], direct[name])


def _direct(tiny, values, t_img, t_text):
    return tiny(
        {**values, "data_type": torch.ones(B, dtype=torch.long)},
        {"image": torch.full((B,), t_img), "text": torch.full((B,), t_text)},
    )


@pytest.mark.parametrize("mode", ["uncond", "empty"])
def test_t2i_guidance_formula_in_one_batched_call(tiny, mode):
    s = 2.5
    given = given_for(tiny, "t2i")
    empty = {"text": torch.randn(8, 8)}
    gen = torch.Generator().manual_seed(7)
    fn = TaskModel(
        tiny, SCHEDULE, TASKS["t2i"], given=given, labels={"data_type": 1}, guidance_scale=s,
        guidance=mode, empty=empty if mode == "empty" else None, generator=gen,
    )  # fmt: skip
    rec = Recorder(tiny)
    x = torch.randn(B, fn.layout.numel)
    eps = fn.layout.unpack(fn(x, 0.4))
    assert len(rec.calls) == 1 and rec.calls[0][0]["img"].shape[0] == 2 * B  # cond + uncond, one call

    state = fn.layout.unpack(x)
    cond = _direct(tiny, {**state, **given}, 400.0, 0.0)
    if mode == "uncond":
        noise = torch.randn(B, 8, 8, generator=torch.Generator().manual_seed(7))
        uncond = _direct(tiny, {**state, "text": noise}, 400.0, 1000.0)
    else:
        uncond = _direct(tiny, {**state, "text": empty["text"].expand(B, 8, 8)}, 400.0, 0.0)
    for name in ("img", "clip_img"):
        torch.testing.assert_close(eps[name], (1 + s) * cond[name] - s * uncond[name], rtol=1e-4, atol=1e-5)


def test_joint_guidance_uses_each_groups_marginal(tiny):
    s = 1.5
    gen = torch.Generator().manual_seed(3)
    fn = TaskModel(
        tiny, SCHEDULE, TASKS["joint"], batch_size=B, labels={"data_type": 1}, guidance_scale=s, generator=gen
    )
    rec = Recorder(tiny)
    x = torch.randn(B, fn.layout.numel)
    eps = fn.layout.unpack(fn(x, 0.7))
    assert len(rec.calls) == 1 and rec.calls[0][0]["text"].shape[0] == 3 * B  # three passes, one call

    state = fn.layout.unpack(x)
    replay = torch.Generator().manual_seed(3)  # the same noise draws, in pass order
    text_noise = torch.randn(B, 8, 8, generator=replay)
    clip_noise = torch.randn(B, 16, generator=replay)
    img_noise = torch.randn(B, 4, 8, 8, generator=replay)
    cond = _direct(tiny, state, 700.0, 700.0)
    image_only = _direct(tiny, {**state, "text": text_noise}, 700.0, 1000.0)
    text_only = _direct(tiny, {**state, "clip_img": clip_noise, "img": img_noise}, 1000.0, 700.0)
    for name, uncond in (("img", image_only), ("clip_img", image_only), ("text", text_only)):
        torch.testing.assert_close(eps[name], (1 + s) * cond[name] - s * uncond[name], rtol=1e-4, atol=1e-5)


def test_one_network_call_per_solver_step(tiny):
    rec = Recorder(tiny)
    generate(
        tiny,
        SCHEDULE,
        "t2i",
        given=given_for(tiny, "t2i"),
        labels={"data_type": 1},
        steps=6,
        guidance_scale=3.0,
    )
    assert len(rec.calls) == 6


def test_absent_groups_get_fresh_noise_every_call(tiny):
    rec = Recorder(tiny)
    generate(
        tiny,
        SCHEDULE,
        "i",
        batch_size=B,
        labels={"data_type": 1},
        steps=3,
        generator=torch.Generator().manual_seed(0),
    )
    texts = [call[0]["text"] for call in rec.calls]
    assert len(texts) == 3 and not torch.equal(texts[0], texts[1]) and not torch.equal(texts[1], texts[2])
    assert all(abs(t.std().item() - 1) < 0.3 for t in texts)


def test_seeded_generation_is_reproducible_and_sizes_change(tiny):
    kwargs = dict(given=given_for(tiny, "t2i"), labels={"data_type": 1}, steps=4, sizes={"img": (8, 12)})
    a = generate(tiny, SCHEDULE, "t2i", generator=torch.Generator().manual_seed(5), **kwargs)
    b = generate(tiny, SCHEDULE, "t2i", generator=torch.Generator().manual_seed(5), **kwargs)
    assert a["img"].shape == (B, 4, 8, 12) and torch.equal(a["img"], b["img"])


def test_any_number_of_groups():
    cfg = UViTConfig(
        (vector("a", 3, "ga"), sequence("b", 4, 2, "gb"), image("c", 2, 4, 4, "gc")),
        ("ga", "gb", "gc"),
        32,
        2,
        2,
    )
    model = UViT(cfg).eval()
    inputs, _ = random_inputs(cfg, 2)
    task = Task.of("a_and_b_given_c", ga="generate", gb="generate", gc="given")
    out = generate(model, SCHEDULE, task, given={"c": inputs["c"]}, steps=3, guidance_scale=1.0)
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 4, 2)
    out = generate_chain(model, SCHEDULE, [Task.of("c", ga="absent", gb="absent", gc="generate"),
                                           Task.of("a|c", ga="generate", gb="absent", gc="given")], batch_size=2, steps=2)  # fmt: skip
    assert set(out) == {"a", "c"}


BAD = [
    (dict(task="t2i"), r"given: task 't2i' needs values for \['text'\], got \[\]"),
    (dict(task="joint"), r"batch_size=None: expected an integer >= 1"),
    (dict(task="joint", batch_size=0), r"batch_size=0"),
    (dict(task="t2i2i"), r"task='t2i2i': expected a Task or one of"),
    (dict(task="joint", batch_size=2, labels={}), r"labels: this model needs \['data_type'\], got \[\]"),
    (dict(task="joint", batch_size=2, guidance="cfg"), r"guidance='cfg': expected one of"),
    (dict(task="joint", batch_size=2, guidance_scale=float("nan")), r"guidance_scale=nan"),
    (
        dict(task="joint", batch_size=2, x_T=torch.zeros(2, 5)),
        r"x_T: expected shape \(2, 336\), got \(2, 5\)",
    ),
    (dict(task="joint", batch_size=2, steps=0), r"steps=0: expected an integer >= 1"),
    (
        dict(task="t2i", given={"text": torch.zeros(2, 8, 7)}),
        r"given\['text'\]: expected shape \(2, 8, 8\) or \(8, 8\), got \(2, 8, 7\)",
    ),
    (dict(task="t2i", given={"text": torch.full((2, 8, 8), float("nan"))}), r"given\['text'\]: contains NaN"),
    (
        dict(task="t2i", given={"text": torch.zeros(2, 8, 8)}, guidance="empty", guidance_scale=1.0),
        r"empty: guidance='empty' needs values for \['text'\]",
    ),
    (
        dict(task=Task.of("x", image="generate")),
        r"task 'x' sets groups \['image'\], but the model's groups are",
    ),
    (
        dict(task="joint", batch_size=2, sizes={"img": (7, 8)}),
        r"sizes\['img'\]=\(7, 8\): expected positive multiples of 2",
    ),
    (
        dict(task="joint", batch_size=2, sizes={"image": (8, 8)}),
        r"sizes: \['image'\] name no image modality; this model's images are \['img'\]",
    ),
    (
        dict(task="joint", batch_size=2, labels={"data_type": 0.5}),
        r"labels\['data_type'\]=0.5: expected whole",
    ),
    (dict(task="joint", batch_size=2, guidance_scale=float("inf")), r"guidance_scale=inf"),
    (dict(task="joint", batch_size=2, x_T=[[0.0]]), r"x_T: expected a tensor of shape \(2, 336\), got list"),
    (dict(task="joint", batch_size=2, generator=0), r"generator=0: expected a torch.Generator or None"),
    (dict(task="joint", batch_size=2, callback=3), r"callback=3: expected a function"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_task_arguments_are_named(tiny, kwargs, message):
    kwargs = {"labels": {"data_type": 1}, **kwargs}
    task = kwargs.pop("task")
    with pytest.raises(ValueError, match=message):
        generate(tiny, SCHEDULE, task, **kwargs)


def test_a_chain_of_unknown_task_names_is_refused(tiny):
    with pytest.raises(ValueError, match=r"tasks: \['foo'\] are no tasks"):
        generate_chain(
            tiny, SCHEDULE, ["t2i", "foo"], given={"text": torch.zeros(1, 8, 8)}, labels={"data_type": 1}
        )


def test_bad_task_definitions():
    with pytest.raises(ValueError, match="role 'maybe'"):
        Task.of("x", image="maybe")
    with pytest.raises(ValueError, match="no group is generated"):
        Task.of("x", image="given", text="absent")
