"""It learns: a small model trained for about a minute on a world whose joint law is known.

The toy world (unidiffuser.toy): label ~ priors (0.4, 0.3, 0.2, 0.1); the "image" is a 2-D point
from the label's Gaussian cluster, the "text" the label's code sequence. ``measure`` computes each
statistic both on the model's samples and on exact samples of the law, so every bound below is
set against the law's own value. With 1000 samples a share has a sampling sd of at most 0.016, so
the bounds leave the model room for its own error after a minute of training while staying far
from chance (a random label agrees 25% of the time, the majority label 40%).
"""

import itertools

import pytest
import torch

from unidiffuser.schedule import NoiseSchedule
from unidiffuser.tasks import Task, generate
from unidiffuser.toy import ToyWorld, measure, model_draw, train_toy, true_draw

pytestmark = pytest.mark.slow
SCHEDULE = NoiseSchedule()
N = 1000


@pytest.fixture(scope="module")
def trained():
    world = ToyWorld()
    model = train_toy(world, steps=2500, seed=0)  # about 60 s on 2 CPU cores
    gen = torch.Generator().manual_seed(1)
    law = measure(world, true_draw(world, gen), N, gen)
    plain = measure(world, model_draw(model, SCHEDULE, steps=25, generator=gen), N, gen)
    guided = measure(world, model_draw(model, SCHEDULE, steps=25, guidance_scale=3.0, generator=gen), N, gen)
    for key in law:
        print(f"{key:<45} law {law[key]:.3f}  model {plain[key]:.3f}  guided {guided[key]:.3f}")
    return law, plain, guided


def test_the_law_itself(trained):
    """The readers are exact on the law: shares match the priors, agreements the Bayes rates."""
    law, _, _ = trained
    assert law["t2i: point lies in the prompted cluster"] > 0.94
    assert law["joint: max |caption share - prior|"] < 0.05
    assert law["t: max |caption share - prior|"] < 0.05


def test_conditionals_are_learned(trained):
    law, model, _ = trained
    # x | y falls in y's cluster
    assert (
        model["t2i: point lies in the prompted cluster"]
        > law["t2i: point lies in the prompted cluster"] - 0.1
    )
    # y | x recovers the label (the law itself reaches 0.94: clusters overlap)
    assert model["i2t: caption names the point's label"] > 0.7
    # the chains compose the two
    assert model["i2t2i: new point in the source's cluster"] > 0.65
    assert model["t2i2t: new caption names the prompt"] > 0.65


def test_joint_and_marginals_are_learned(trained):
    law, model, _ = trained
    assert model["joint: point and caption agree"] > law["joint: point and caption agree"] - 0.1
    for key in (
        "joint: max |caption share - prior|",
        "i: max |cluster share - prior|",
        "t: max |caption share - prior|",
    ):
        assert model[key] < 0.08, key  # every label's share within 8 points of its prior


def test_guidance_sharpens_conditionals(trained):
    law, model, guided = trained
    p = "t2i: mean p(prompt | point)"
    assert guided[p] > model[p] + 0.03 and guided[p] > law[p]  # sharper than the law itself
    assert guided["i2t: caption names the point's label"] > model["i2t: caption names the point's label"]


def test_three_modalities_every_conditional():
    """A third group (a colour vector): every task with a given and a generated group works."""
    world = ToyWorld(colour=True)
    model = train_toy(world, steps=1500, seed=0)
    gen = torch.Generator().manual_seed(2)
    data = world.sample(400, gen)
    readers = {"point": world.read_point, "caption": world.read_caption, "colour": world.read_colour}
    member = {"image": "point", "text": "caption", "colour": "colour"}
    checked = 0
    for roles in itertools.product(("generate", "given", "absent"), repeat=3):
        roles = dict(zip(("image", "text", "colour"), roles, strict=True))
        if "generate" not in roles.values() or "given" not in roles.values():
            continue
        task = Task.of("+".join(f"{g}:{r}" for g, r in roles.items()), **roles)
        given = {member[g]: data[member[g]] for g in task.given}
        out = generate(model, SCHEDULE, task, given=given, steps=15, generator=gen)
        for g in task.generated:
            agree = (readers[member[g]](out[member[g]]) == data["label"]).float().mean().item()
            assert agree > 0.6, (task.name, g, agree)  # chance: 0.25 to 0.4
            checked += 1
    assert checked == 15  # 12 tasks: 9 with one generated group, 3 with two
