"""The pipeline end to end on tiny random components: every mode, seeds, sizes and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from unidiffuser.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


def picture(width=80, height=60, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    return image.convert(mode)


def test_text_to_image_shapes_order_and_latents(pipe):
    out = pipe.text_to_image(["a red circle", "a blue square"], num_samples=2, steps=4, return_latents=True)
    assert len(out.images) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in out.images)
    assert out.latents["img"].shape == (4, 4, 8, 8) and out.latents["clip_img"].shape == (4, 16)
    assert out.texts == []


def test_every_mode(pipe):
    image = picture()
    assert len(pipe.image_to_text([image, picture(seed=1)], num_samples=2, steps=3).texts) == 4
    joint = pipe.joint(3, steps=3)
    assert len(joint.images) == 3 and len(joint.texts) == 3
    assert len(pipe.image(2, steps=3).images) == 2
    assert len(pipe.text(2, steps=3).texts) == 2
    variation = pipe.image_variation(image, num_samples=2, steps=3)
    assert len(variation.images) == 2 and len(variation.texts) == 2
    assert len(pipe.text_variation("a cat", steps=3).texts) == 1
    hops = pipe.hop(image, hops=3, steps=3)
    assert len(hops.texts) == 2 and len(hops.images) == 1  # i2t, t2i, i2t
    assert len(pipe.interpolate(image, picture(seed=2), frames=4, steps=4).images) == 4
    for mode in ("t2i", "i2t", "joint", "i", "t", "i2t2i", "t2i2t"):
        kwargs = (
            {"prompts": "a dog"}
            if mode in ("t2i", "t2i2t")
            else {"images": image}
            if mode in ("i2t", "i2t2i")
            else {}
        )
        result = pipe(mode, steps=2, **kwargs)
        assert result.images or result.texts


def test_seeds_make_results_reproducible(pipe):
    a = pipe.text_to_image("a cat", steps=3, seed=3, return_latents=True).latents["img"]
    b = pipe.text_to_image("a cat", steps=3, seed=3, return_latents=True).latents["img"]
    c = pipe.text_to_image("a cat", steps=3, seed=4, return_latents=True).latents["img"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_modes_differ(pipe):
    def latents(**kw):
        return pipe.text_to_image("a cat", steps=3, seed=1, return_latents=True, **kw).latents["img"]

    plain, uncond = latents(guidance_scale=0.0), latents(guidance_scale=5.0)
    empty, negative = (
        latents(guidance_scale=5.0, guidance="empty"),
        latents(guidance_scale=5.0, negative_prompt="blur"),
    )
    assert (
        not torch.equal(plain, uncond) and not torch.equal(uncond, empty) and not torch.equal(empty, negative)
    )


def test_other_resolutions(pipe):
    out = pipe.text_to_image("a cat", steps=2, height=48, width=96, return_latents=True)
    assert out.images[0].size == (96, 48) and out.latents["img"].shape == (1, 4, 6, 12)
    with pytest.raises(ValueError, match="height=50: expected a positive multiple of 16"):
        pipe.text_to_image("a cat", steps=2, height=50)


def test_image_kinds_are_accepted(pipe, tmp_path):
    """Grayscale, RGBA, 16-bit, tiny and large images all become RGB at the model's size."""
    gray = picture(mode="L")
    rgba = picture(mode="RGBA")
    deep = Image.fromarray((np.random.default_rng(0).random((40, 30)) * 65535).astype("uint16"))
    tiny = picture(4, 3)
    large = picture(1600, 1200)
    path = tmp_path / "deep.png"
    deep.save(path)
    out = pipe.image_to_text([gray, rgba, str(path), tiny, large], steps=2)
    assert len(out.texts) == 5


def test_prompts_of_every_kind(pipe):
    long = " ".join(["a very long prompt"] * 100)  # truncated to CLIP's 77 tokens, with a warning
    with pytest.warns(UserWarning, match=r"texts \[1\]: longer than the 77 tokens the text encoder reads"):
        out = pipe.text_to_image(["", long, "une chatte noire, 黒い猫"], steps=2, return_latents=True)
    assert out.latents["img"].shape[0] == 3


BAD = [
    (lambda p: p.text_to_image([], steps=2), "prompts: expected at least one string"),
    (lambda p: p.text_to_image(["ok", 3], steps=2), r"prompts: expected strings, got \['int'\]"),
    (lambda p: p.text_to_image("a", num_samples=0), "num_samples=0: expected an integer >= 1"),
    (lambda p: p.text_to_image("a", seed=-1), "seed=-1: expected a non-negative integer"),
    (lambda p: p.text_to_image("a", steps=0), "steps=0: expected an integer >= 1"),
    (lambda p: p.text_to_image("a", guidance="cfg"), "guidance='cfg'"),
    (lambda p: p.image_to_text([], steps=2), "images: expected a non-empty list"),
    (lambda p: p.image_to_text("no/such/file.png", steps=2), "no/such/file.png"),
    (lambda p: p.interpolate(picture(), picture(), frames=1), "frames=1: expected an integer >= 2"),
    (lambda p: p.hop("a dog", hops=0), "hops=0"),
    (lambda p: p("paint"), "mode='paint'"),
    # a zero size is not the trained size; an infinite or boolean scale is no scale
    (lambda p: p.text_to_image("a", height=0, steps=1), "height=0: expected a positive multiple of 16"),
    (lambda p: p.joint(width=True, steps=1), "width=True: expected a positive multiple"),
    (
        lambda p: p.text_to_image("a", guidance_scale=float("inf"), steps=1),
        "guidance_scale=inf: expected a finite",
    ),
    (lambda p: p.image_to_text(picture(), guidance_scale=True, steps=1), "guidance_scale=True"),
    (lambda p: setattr(p, "guidance_scale", -5), r"guidance_scale=-5: expected a finite number >= 0"),
    (
        lambda p: p.to(dtype="float16"),
        r"dtype='float16': expected torch.float32, torch.bfloat16 or torch.float16",
    ),
    (lambda p: p.to(dtype=torch.int64), r"dtype=torch.int64: expected torch.float32"),
    (lambda p: p.to(device="gpu"), "device 'gpu': not a device name; use cpu, cuda, cuda:N or auto"),
    # hop: a missing image file is not taken for a prompt
    (
        lambda p: p.hop("photo_of_a_circle.png", hops=1, steps=1),
        "image file not found: 'photo_of_a_circle.png'",
    ),
    (lambda p: p.hop(" ", hops=1, steps=1), "start: an empty string"),
    (lambda p: p.text_to_image("a", seed=True), "seed=True: expected a non-negative integer"),
    (lambda p: p.text_to_image("a", seed=2**70), r"seed=1180591620717411303424: expected .* below 2\*\*63"),
    (lambda p: p.text_to_image(5), "prompts: expected a string or a list of strings, got int"),
    (lambda p: p.image(True), "num_samples=True: expected an integer >= 1"),
    (lambda p: p.image_to_text(Image.new("RGB", (0, 0)), steps=1), "image of 0x0 pixels: it holds no pixel"),
    (lambda p: p.image_to_text("/", steps=1), "'/' is a folder; give an image file"),
    (lambda p: p.joint(steps=2, progress=3), r"progress=3: expected a function"),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_inputs(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_unreadable_and_truncated_image_files(pipe, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    picture().save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    for path in (text, cut):
        with pytest.raises(ValueError, match=path.name):
            pipe.image_to_text(str(path), steps=2)


def test_progress_reports_every_solver_step_in_model_evaluations(pipe):
    seen = []
    pipe.text_to_image(
        "a cat", steps=6, solver="dpm++2m", progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(i, 6) for i in range(1, 7)]
    seen.clear()
    pipe.text_to_image(
        "a cat", steps=6, solver="dpm++3s", progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(3, 6), (5, 6), (6, 6)]  # orders [3, 2, 1]: evaluations done of the 6 asked for


def test_interpolation_end_frames_reconstruct_the_inputs(pipe):
    """Inversion then sampling with the same ODE returns each input's latents at its end frame.

    DDIM is first order, so the round-trip error shrinks in proportion to the step count.
    """
    a, b = picture(seed=5), picture(seed=6)
    source = pipe.encode_images([a, b], torch.Generator().manual_seed(0))["img"]  # interpolate's first draw

    def errors(steps):
        frames = pipe.interpolate(a, b, frames=3, steps=steps, seed=0, return_latents=True).latents["img"]
        rel = [
            ((frames[i] - source[j]).norm() / source[j].norm()).item()
            for i, j in ((0, 0), (2, 1), (1, 0), (1, 1))
        ]
        assert rel[2] > 0.3 and rel[3] > 0.3  # the middle frame is neither input
        return max(rel[:2])

    coarse, fine = errors(60), errors(200)
    assert fine < 0.05 and fine < 0.5 * coarse


# -- best_of: several candidates per output, the scorer keeps one ---------------------------------


def _references(pipe, mode, inputs):
    """What each mode's candidates are ranked against: (embeddings of the inputs, how to embed an output)."""
    s = pipe.scorer
    if mode == "t2i":
        return s.embed_texts(inputs), lambda out: s.embed_images(out.images)
    if mode == "t2i2t":
        return s.embed_texts(inputs), lambda out: s.embed_texts(out.texts)
    pictures = pipe.pictures(inputs)
    if mode == "i2t":
        return s.embed_images(pictures), lambda out: s.embed_texts(out.texts)
    return s.embed_images(pictures), lambda out: s.embed_images(out.images)  # i2t2i


@pytest.mark.parametrize("mode", ["t2i", "i2t", "i2t2i", "t2i2t"])
def test_best_of_keeps_the_candidate_nearest_its_input(pipe, mode):
    k, n = 3, 2
    inputs = ["a red circle", "a blue square"] if mode in ("t2i", "t2i2t") else [picture(), picture(seed=1)]
    drawn = pipe(mode, **{"prompts" if mode in ("t2i", "t2i2t") else "images": inputs},
                 num_samples=n * k, steps=3, seed=6, return_latents=True)  # fmt: skip
    best = pipe(mode, **{"prompts" if mode in ("t2i", "t2i2t") else "images": inputs},
                num_samples=n, best_of=k, steps=3, seed=6, return_latents=True)  # fmt: skip
    refs, embed = _references(pipe, mode, inputs)
    scores = (embed(drawn) * refs.repeat_interleave(n * k, dim=0)).sum(-1).view(len(inputs) * n, k)
    keep = (torch.arange(len(inputs) * n) * k + scores.argmax(1)).tolist()
    assert scores.argmax(1).any()  # seed 6 makes some choice other than the first candidate
    for name, latents in best.latents.items():
        assert torch.equal(latents, drawn.latents[name][keep]), name
    assert best.texts == [drawn.texts[i] for i in keep] if drawn.texts else not best.texts
    assert len(best.images) == (len(keep) if drawn.images else 0)


def test_best_of_joint_keeps_the_pair_that_agrees_most(pipe):
    k = 4
    drawn = pipe.joint(2 * k, steps=3, seed=2, return_latents=True)
    best = pipe.joint(2, best_of=k, steps=3, seed=2, return_latents=True)
    s = pipe.scorer
    scores = (s.embed_images(drawn.images) * s.embed_texts(drawn.texts)).sum(-1).view(2, k)
    keep = (torch.arange(2) * k + scores.argmax(1)).tolist()
    assert best.texts == [drawn.texts[i] for i in keep]
    assert torch.equal(best.latents["img"], drawn.latents["img"][keep])


def test_best_of_needs_a_scorer_and_a_count():
    bare = tiny_pipeline(seed=0, scorer=False)
    assert bare.text_to_image("a cat", steps=2).images  # best_of=1 needs none
    with pytest.raises(ValueError, match=r"best_of=2 ranks candidates with a CLIP scorer.*scorer=DIR"):
        bare.text_to_image("a cat", steps=2, best_of=2)
    with pytest.raises(ValueError, match=r"best_of=0: expected an integer >= 1"):
        bare.joint(1, best_of=0)
    with pytest.raises(ValueError, match=r"best_of=True"):
        bare.image_to_text(picture(), best_of=True)
