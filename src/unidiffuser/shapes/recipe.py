"""`unidiffuser recipe shapes`: every component of the small shapes model, trained from a seed.

The stages, each a folder of ``out`` and each resumable (a finished stage is skipped, an
interrupted one continues from its last checkpoint):

    tokenizers/   the world's CLIP-style and GPT-2-style tokenizers   (shapes.tokenizer)
    clip/         a small CLIP, trained contrastively                 (shapes.clip_training)
    vae/          a small AutoencoderKL, 64 px -> 16 x 16 x 4           (shapes.vae_training)
    decoder/      the caption decoder on the CLIP text features       (unidiffuser train-decoder)
    components/   those four with an untrained U-ViT and the whole CLIP as the best-of scorer, in
                  our model format (with --frozen-from MODEL the four stages above are skipped
                  and MODEL's parts are used)
    data/         rendered train-split scenes, one PNG and one .txt caption each
    features/     the frozen encoders' features of data/              (unidiffuser extract)
    uvit/         the U-ViT, trained on features/                     (unidiffuser train)
    tune/         the U-ViT fine-tuned with clean conditions; its     (unidiffuser train --clean-prob,
                  second phase weighs the image latent's loss up,     then also --loss-weight img=W,
                  its third the text latent's too                     then also text=V)
    model/        the finished model: components/ with the tuned U-ViT's EMA weights
    recipe.json   the options, and each stage's seconds and device

``Recipe.full()`` is the shipped model's recipe (16.3 hours on 2 CPU cores, nearly all of it the
U-ViT; the README lists each stage's measured time); ``Recipe.hour()`` makes a weaker model in about
an hour there; ``Recipe.smoke()`` runs every stage for a few steps, for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..training.config import MIXED_PRECISION, TrainConfig
from .stage import write_text_atomic

SHAPES_DOWNSAMPLE = 4  # the shapes autoencoder's pixels per latent pixel a side (vae_training.SHAPES_VAE)
STAGES = ("tokenizers", "clip", "vae", "decoder", "components", "data", "features", "uvit", "tune", "model")
FROZEN_STAGES = STAGES[:4]  # what --frozen-from takes from another model instead of training
SHAPES_PROMPTS = (
    "a big red circle in the center",
    "a small blue square at the top left",
    "a big green triangle to the left of a small yellow circle",
    "a small white cross above a big magenta diamond",
)


@dataclass(frozen=True)
class Recipe:
    """How much of each stage to run; the defaults are the shipped model's recipe."""

    seed: int = 0
    device: str = "cpu"
    image_size: int = 64
    clip_steps: int = 5000
    clip_batch: int = 128
    # The share of CLIP's pairs drawn in grays and captioned without colours (clip_training's
    # colourless): its image tower then writes a held-out pair's shape apart from its colour
    # (docs/shapes-model.md); 0 as shipped.
    clip_colourless: float = 0.0
    vae_steps: int = 1500
    vae_batch: int = 16
    decoder_captions: int = 50_000
    decoder_steps: int = 3000
    decoder_batch: int = 64
    decoder_lr: float = 5e-4
    examples: int = 60_000
    uvit_width: int = 192
    uvit_depth: int = 8
    uvit_heads: int = 4
    # The latent (image_size / 4 a side) cut into this many patches a side: 4 gives 16 image tokens.
    uvit_image_tokens: int = 4
    uvit_steps: int = 35_000
    uvit_batch: int = 64
    uvit_lr: float = 3e-4
    uvit_warmup: int = 200
    uvit_decay: int = 15_000  # the last steps lower the learning rate linearly to 0
    ema_decay: float = 0.999
    # Min-SNR-gamma weighting over timesteps in the uvit and tune runs (objective.py's snr_gamma);
    # 0 weighs every timestep alike, as the shipped model was trained.
    snr_gamma: float = 0.0
    # The tune stage: from the U-ViT's EMA, with one group clean in tune_clean_prob of the examples
    # (objective.py); a constant rate after 100 warm-up steps, lowered to 0 over the last tune_decay
    # of each phase. Three phases: every modality weighs the same until step tune_weigh_from, then the
    # image latent's loss weighs tune_img_weight (the shape of an object is a few latent pixels, so
    # its share of a plain loss is small), and from step tune_text_from the text latent's loss also
    # weighs tune_text_weight (so the caption rows do not pay for the picture rows).
    tune_steps: int = 63_000
    tune_clean_prob: float = 0.5
    tune_lr: float = 1e-4
    tune_decay: int = 1500
    tune_weigh_from: int = 8000
    tune_img_weight: float = 10.0
    tune_text_from: int = 16_000
    tune_text_weight: float = 3.0
    checkpoint_every: int = 500
    # The model's default guidance scale (unidiffuser.json's sampling.guidance_scale): the scale
    # that scored best with `unidiffuser eval shapes` (the released model's 7 is worse here).
    guidance_scale: float = 3.0
    # The model's solver time grid (sampling.grid): uniform in log-SNR captioned held-out scenes
    # better than the released uniform-in-t grid at 50 steps, and drew pictures as well.
    grid: str = "logsnr"
    precision: str = "no"  # the U-ViT runs' mixed precision: "no", or "bf16"/"fp16" on a GPU
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # Take the tokenizers, CLIP, autoencoder and caption decoder from this model ("shipped" or a
    # folder) instead of training them; the U-ViT is still trained from the seed. "" trains them all.
    frozen_from: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or isinstance(value, str):
                continue
            if not math.isfinite(value) or value < 0 or (value == 0 and f.name not in _MAY_BE_ZERO):
                bound = ">= 0" if f.name in _MAY_BE_ZERO else "> 0"
                raise ValueError(f"{f.name}={value}: expected a finite number {bound}")
        if not 0.0 <= self.clip_colourless < 1.0:
            raise ValueError(
                f"clip_colourless={self.clip_colourless}: expected a share in [0, 1), such as 0.5"
            )
        if not 0.0 <= self.tune_clean_prob < 1.0:
            raise ValueError(
                f"tune_clean_prob={self.tune_clean_prob}: expected a share in [0, 1), such as 0.5"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay}: expected a value in (0, 1), such as 0.999")
        if self.uvit_width % self.uvit_heads:
            raise ValueError(
                f"uvit_width={self.uvit_width}: expected a multiple of uvit_heads={self.uvit_heads}"
            )
        if self.tune_text_from < self.tune_weigh_from:
            raise ValueError(
                f"tune_text_from={self.tune_text_from}: expected >= tune_weigh_from={self.tune_weigh_from} "
                "(the text weight joins the image weight)"
            )
        latent_side, rest = divmod(self.image_size, SHAPES_DOWNSAMPLE)
        if rest:
            raise ValueError(f"image_size={self.image_size}: expected a multiple of {SHAPES_DOWNSAMPLE}")
        if latent_side % self.uvit_image_tokens:
            fits = [n for n in range(1, latent_side + 1) if latent_side % n == 0]
            raise ValueError(
                f"image_size={self.image_size}, uvit_image_tokens={self.uvit_image_tokens}: the "
                f"{SHAPES_DOWNSAMPLE}x smaller latent ({latent_side} a side) must split into "
                f"uvit_image_tokens patches a side; use one of {fits}"
            )
        from ..solvers import check_grid  # torch, which this module leaves unimported

        check_grid(self.grid)
        if self.precision not in MIXED_PRECISION:
            raise ValueError(f"precision={self.precision!r}: expected one of {MIXED_PRECISION}")

    @classmethod
    def full(cls, **overrides: Any) -> Recipe:
        return cls(**overrides)

    @classmethod
    def hour(cls, **overrides: Any) -> Recipe:
        """The whole recipe in about an hour on 2 CPU cores (46 to 81 minutes measured): shorter encoder stages, half the
        scenes, and a smaller U-ViT (128 wide, 6 blocks: about 2.4 times the steps a second of the
        shipped one) trained 2000 steps and tuned 10,000 with both loss weights from the start, at
        higher rates than the full recipe's (in so few steps they learn more: the README compares
        them). The README states what it reaches; it is well below the shipped model."""
        short = dict(
            clip_steps=1500,
            vae_steps=800,
            decoder_captions=20_000,
            decoder_steps=1500,
            examples=30_000,
            uvit_width=128,
            uvit_depth=6,
            uvit_steps=2000,
            uvit_lr=1e-3,
            uvit_decay=0,  # the tune goes on from it at a high rate
            ema_decay=0.995,  # 0.999 would still hold 13% of the random start after 2000 steps
            tune_steps=10_000,
            tune_lr=6e-4,
            tune_decay=3000,
            tune_weigh_from=0,
            tune_text_from=0,
        )
        return cls(**{**short, **overrides})

    @classmethod
    def smoke(cls, **overrides: Any) -> Recipe:
        """Every stage for a few steps: checks the plumbing, learns nothing."""
        small = dict(
            clip_steps=4,
            clip_batch=8,
            vae_steps=4,
            vae_batch=4,
            decoder_captions=64,
            decoder_steps=4,
            decoder_batch=8,
            examples=48,
            uvit_width=32,
            uvit_depth=2,
            uvit_heads=2,
            uvit_steps=4,
            uvit_batch=8,
            uvit_warmup=2,
            uvit_decay=2,
            tune_steps=4,
            tune_decay=1,
            tune_weigh_from=2,
            tune_text_from=3,
            checkpoint_every=2,
        )
        return cls(**{**small, **overrides})


PRESETS: dict[str, Callable[..., Recipe]] = {"full": Recipe.full, "hour": Recipe.hour, "smoke": Recipe.smoke}
_MAY_BE_ZERO = (
    "tune_steps", "tune_decay", "tune_weigh_from", "tune_text_from", "uvit_decay", "threads", "guidance_scale",
    "clip_colourless", "snr_gamma",
)  # fmt: skip
# Options with flags of their own on `unidiffuser recipe`, so not set with --set.
_FLAGGED = ("seed", "device", "threads", "frozen_from")


def _settable() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Recipe) if f.name not in _FLAGGED]


def recipe_options() -> list[str]:
    """``KEY=DEFAULT`` of every option ``--set`` may change."""
    return [f"{f.name}={f.default}" for f in _settable()]


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set uvit_steps=100000``) -> Recipe options of their fields' types.

    Raises:
        ValueError: no "=", a key that is no option (or one with a flag of its own), or a value
            that is not of the option's type.
    """
    fields = {f.name: type(f.default) for f in _settable()}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"{pair!r}: expected KEY=VALUE, such as uvit_steps=100000")
        if key in _FLAGGED:
            raise ValueError(f"{pair!r}: {key} has a flag of its own (--{key})")
        if key not in fields:
            raise ValueError(f"{pair!r}: {key!r} is no recipe option; the options are {', '.join(fields)}")
        kind = fields[key]
        try:
            options[key] = kind(text.strip())
        except ValueError:
            raise ValueError(
                f"{pair!r}: expected {'an int' if kind is int else f'a {kind.__name__}'}"
            ) from None
    return options


def network_config(recipe: Recipe, prefix_dim: int, clip_dim: int, text_length: int, latent_side: int):
    """The U-ViT of the shapes model: the 16 x 16 x 4 latent in ``uvit_image_tokens`` patches a side
    (the shipped model: 4 x 4 patches of 4 x 4, 16 tokens), one CLIP token, the (24, 16) text latent."""
    from ..network import image_text_config

    return image_text_config(
        latent=(4, latent_side, latent_side),
        clip_dim=clip_dim,
        text=(text_length, prefix_dim),
        width=recipe.uvit_width,
        depth=recipe.uvit_depth,
        num_heads=recipe.uvit_heads,
        data_type=False,
        patch_size=latent_side // recipe.uvit_image_tokens,
    )


DECODER_PREFIX_DIM = 16


def decoder_architecture(vocab_size: int, text_length: int) -> dict[str, Any]:
    """A two-layer, 128-wide GPT-2 reading captions from a (text_length, 16) latent."""
    return {
        "prefix_dim": DECODER_PREFIX_DIM,
        "feature_dim": 64,
        "gpt2": {
            "n_embd": 128,
            "n_layer": 2,
            "n_head": 4,
            "vocab_size": vocab_size,
            "n_positions": text_length + 72,  # room for beam search's 67 new tokens
        },
    }


class _Stages:
    """Runs the stages in order, skipping finished ones, and records each one's time in recipe.json."""

    IGNORED = ("threads",)  # options that do not change what a stage makes

    def __init__(self, out: Path, recipe: Recipe, log: Callable[[str], None], only: Sequence[str] | None):
        self.out, self.recipe, self.log, self.only = out, recipe, log, only
        self.done: dict[str, Callable[[], bool]] = {}  # each stage's test, as the stages are reached
        self.record_path = out / "recipe.json"
        mine = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in self.IGNORED}
        saved = self._read().get("recipe")
        if saved is not None:
            defaults = dataclasses.asdict(Recipe())  # an option newer than the record had its default
            differ = sorted(k for k in mine if saved.get(k, defaults[k]) != mine[k])
            if differ:
                raise ValueError(
                    f"{out}: made by a recipe with other options ({', '.join(differ)}); "
                    "use another --out, or the same options to resume"
                )
        self._write({"recipe": mine, "stages": self._read().get("stages", {})})

    def _read(self) -> dict:
        return json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}

    def _write(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record_path, json.dumps(record, indent=2) + "\n")

    def run(
        self, name: str, done: Callable[[], bool], work: Callable[[], None], needs: Sequence[str] = ()
    ) -> None:
        """Run stage ``name`` unless ``done()``; ``needs``: the stages it reads, which must be done."""
        self.done[name] = done
        if self.only is not None and name not in self.only:
            return
        if done():
            self.log(f"[{name}] done already")
            return
        missing = [n for n in needs if not self.done[n]()]
        if missing:  # only with --stage: otherwise the stages before have just run
            what = f"stage {missing[0]}" if len(missing) == 1 else f"stages {', '.join(missing)}"
            flags = " ".join(f"--stage {n}" for n in missing)
            raise ValueError(
                f"stage {name} reads what {what} {'makes' if len(missing) == 1 else 'make'}, and {self.out} holds no finished one: run "
                f"{flags} first with the same options, or leave out --stage to run every stage"
            )
        self.log(f"[{name}] running")
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        # Read again: stages may run in other processes at the same time (--stage) and record theirs.
        record = self._read()
        previous = record["stages"].get(name, {}).get("seconds", 0.0)
        record["stages"][name] = {"seconds": round(previous + seconds, 1), "device": self.recipe.device}
        self._write(record)
        self.log(f"[{name}] finished in {seconds:.0f} s")


def run_recipe(
    out: str | Path,
    recipe: Recipe | None = None,
    log: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
) -> Path:
    """Run (or resume) every stage into ``out``, or only the named ones; returns ``out/model``.

    A stage named in ``only`` refuses to run before the stages it reads are finished (a
    ValueError names them): decoder reads tokenizers and clip, components those two, vae and
    decoder, features components and data, uvit components and features, tune uvit, model
    components and the last training run. So stages that read nothing of each other may run at the
    same time in other processes (tokenizers, clip, vae and data read nothing).
    """
    import torch

    recipe = recipe or Recipe.full()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    out = Path(out)
    unknown = sorted(set(only or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"stages {unknown}: expected some of {list(STAGES)}")
    stages = _Stages(out, recipe, log, only)
    paths = {name: out / name for name in ("tokenizers", "clip", "vae", "decoder", "components")}

    if recipe.frozen_from:
        source = frozen_source(recipe.frozen_from)  # before any stage runs
        for name in FROZEN_STAGES:
            stages.done[name] = lambda: True
            if only is None or name in only:
                log(f"[{name}] taken from {source}")
    else:
        stages.run(
            "tokenizers",
            lambda: (paths["tokenizers"] / "gpt2" / "tokenizer.json").is_file(),
            lambda: _tokenizers(paths["tokenizers"], recipe),
        )
        stages.run(
            "clip",
            lambda: (paths["clip"] / "clip_training.json").is_file(),
            lambda: _clip(paths["clip"], recipe),
        )
        stages.run(
            "vae", lambda: (paths["vae"] / "vae_training.json").is_file(), lambda: _vae(paths["vae"], recipe)
        )
        stages.run(
            "decoder",
            lambda: (paths["decoder"] / "DONE").is_file(),
            lambda: _decoder(out, recipe),
            needs=("tokenizers", "clip"),
        )
    stages.run(
        "components",
        lambda: (paths["components"] / "unidiffuser.json").is_file(),
        lambda: _components(out, recipe),
        needs=FROZEN_STAGES,
    )
    stages.run("data", lambda: (out / "data" / "DONE").is_file(), lambda: _data(out / "data", recipe))
    stages.run(
        "features",
        lambda: (out / "features" / "DONE").is_file(),
        lambda: _features(out, recipe),
        needs=("components", "data"),
    )
    stages.run(
        "uvit",
        lambda: (out / "uvit" / "DONE").is_file(),
        lambda: _uvit(out, recipe),
        needs=("components", "features"),
    )
    stages.run("tune", lambda: (out / "tune" / "DONE").is_file(), lambda: _tune(out, recipe), needs=("uvit",))
    stages.run(
        "model",
        lambda: (out / "model" / "unidiffuser.json").is_file(),
        lambda: _model(out, recipe),
        needs=("components", "tune" if recipe.tune_steps else "uvit"),
    )
    return out / "model"


# ---------------------------------------------------------------------------------------------
# The stages


def _tokenizers(path: Path, recipe: Recipe) -> None:
    from .stage import write_dir
    from .tokenizer import build_caption_tokenizers

    clip_tokenizer, gpt2_tokenizer = build_caption_tokenizers(recipe.seed)

    def save(tmp: Path) -> None:
        clip_tokenizer.save_pretrained(tmp / "clip")
        gpt2_tokenizer.save_pretrained(tmp / "gpt2")

    write_dir(path, save)


def _clip(path: Path, recipe: Recipe) -> None:
    from .clip_training import train_clip

    train_clip(
        path,
        steps=recipe.clip_steps,
        batch_size=recipe.clip_batch,
        image_size=recipe.image_size,
        seed=recipe.seed,
        device=recipe.device,
        checkpoint_every=recipe.checkpoint_every,
        tokenizer_seed=recipe.seed,
        eval_groups=32 if recipe.clip_steps >= 100 else 1,
        colourless=recipe.clip_colourless,
    )


def _vae(path: Path, recipe: Recipe) -> None:
    from .vae_training import train_vae

    train_vae(
        path,
        steps=recipe.vae_steps,
        batch_size=recipe.vae_batch,
        image_size=recipe.image_size,
        seed=recipe.seed,
        device=recipe.device,
        checkpoint_every=recipe.checkpoint_every,
        eval_scenes=512 if recipe.vae_steps >= 100 else 16,
        scale_samples=2048 if recipe.vae_steps >= 100 else 64,
    )


def _decoder(out: Path, recipe: Recipe) -> None:
    from ..training.config import DecoderTrainConfig
    from ..training.decoder import train_decoder
    from .captions import caption
    from .tokenizer import CONTEXT_LENGTH
    from .world import sample_scene

    captions_file = out / "decoder_captions.txt"
    if not captions_file.is_file():
        rng = np.random.default_rng([recipe.seed, 0xCA9])
        lines = [caption(sample_scene(rng), rng) for _ in range(recipe.decoder_captions)]
        write_text_atomic(captions_file, "\n".join(lines) + "\n")
    gpt2_dir = out / "tokenizers" / "gpt2"
    from ..loading import load_tokenizer, with_eos

    vocab = len(with_eos(load_tokenizer(gpt2_dir)))
    config = DecoderTrainConfig(
        captions=str(captions_file),
        text_encoder=str(out / "clip" / "text_encoder"),
        tokenizer=str(gpt2_dir),
        decoder=decoder_architecture(vocab, CONTEXT_LENGTH),
        output_dir=str(out / "decoder"),
        steps=recipe.decoder_steps,
        batch_size=recipe.decoder_batch,
        lr=recipe.decoder_lr,
        warmup_steps=max(1, min(200, recipe.decoder_steps // 10)),
        max_length=32,
        device=recipe.device,
        checkpoint_every=recipe.checkpoint_every,
        keep_last=2,
        seed=recipe.seed,
        resume=True,
    )
    train_decoder(config)
    (out / "decoder" / "DONE").write_text("done\n")


def frozen_source(frozen_from: str) -> Path:
    """The model folder ``--frozen-from`` names: ``shipped`` or a path.

    Raises:
        FileNotFoundError: no model folder there.
    """
    from ..shipped import shipped_model_dir

    if frozen_from == "shipped":
        return shipped_model_dir()
    path = Path(frozen_from)
    if not (path / "unidiffuser.json").is_file():
        raise FileNotFoundError(
            f"--frozen-from {frozen_from}: no unidiffuser.json there; give a shapes model folder "
            "(one `unidiffuser recipe` wrote as DIR/model, or `shipped`)"
        )
    return path


def _frozen_parts(out: Path, recipe: Recipe) -> tuple:
    """The autoencoder, CLIP image and text encoders, caption decoder and CLIP scorer of the model:
    trained by the earlier stages (the scorer is the whole CLIP the two encoders come from), or
    taken from the model ``recipe.frozen_from`` names (its scorer, None where it has none)."""
    if not recipe.frozen_from:
        from ..components.autoencoder import ImageAutoencoder
        from ..components.clip import ClipImageEmbedder, ClipTextEncoder
        from ..components.scorer import ClipScorer
        from ..training.checkpoint import latest_checkpoint
        from ..training.decoder import DECODER_FORMAT, load_decoder_checkpoint

        last = latest_checkpoint(out / "decoder" / "checkpoints", kind=DECODER_FORMAT)
        return (
            ImageAutoencoder.load(out / "vae" / "autoencoder.safetensors"),
            ClipImageEmbedder.from_pretrained_dir(out / "clip" / "image_encoder"),
            ClipTextEncoder.from_pretrained_dir(out / "clip" / "text_encoder"),
            load_decoder_checkpoint(last.path).frozen(),
            ClipScorer.from_pretrained_dir(out / "clip" / "clip"),
        )
    from ..pipeline import UniDiffuser

    source = UniDiffuser.from_pretrained(frozen_source(recipe.frozen_from))
    made_for = source.network.config.modality("img").shape[-1] * source.autoencoder.config.downsample
    if made_for != recipe.image_size:
        raise ValueError(
            f"--frozen-from {recipe.frozen_from}: its autoencoder is made for {made_for} px pictures, "
            f"the recipe's image_size is {recipe.image_size}; use --set image_size={made_for}"
        )
    return (
        source.autoencoder,
        source.image_encoder,
        source.text_encoder,
        source.caption_decoder,
        source.scorer,
    )


def _components(out: Path, recipe: Recipe) -> None:
    """The frozen parts with a U-ViT fresh from the recipe's seed, in our model format."""
    import torch

    from ..network import UViT
    from ..pipeline import UniDiffuser

    autoencoder, image_encoder, text_encoder, decoder, scorer = _frozen_parts(out, recipe)
    config = network_config(
        recipe,
        decoder.config.prefix_dim,
        image_encoder.model.config.projection_dim,
        text_encoder.max_length,
        recipe.image_size // autoencoder.config.downsample,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        network = UViT(config)
    UniDiffuser(
        network,
        autoencoder,
        image_encoder,
        text_encoder,
        decoder,
        guidance_scale=recipe.guidance_scale,
        grid=recipe.grid,
        scorer=scorer,
    ).save_pretrained(out / "components")


RENDER_CHUNK = 500  # scenes a rendering process writes per task
RENDER_PROCESSES_FROM = 4 * RENDER_CHUNK  # fewer scenes are rendered in this process


def _render_pairs(path: str, seed: int, size: int, indices: Sequence[int]) -> int:
    """Write the pairs ``indices`` (scene i from the seed and i alone); returns how many."""
    from .captions import caption
    from .world import render, sample_scene

    folder = Path(path)
    for i in indices:
        image, text = folder / f"{i:06d}.png", folder / f"{i:06d}.txt"
        rng = np.random.default_rng([seed, 0xDA7A, i])
        scene = sample_scene(rng)
        render(scene, size).save(image.with_suffix(".png.tmp"), format="PNG")
        image.with_suffix(".png.tmp").replace(image)
        write_text_atomic(text, caption(scene, rng) + "\n")  # the caption last: it marks the pair written
    return len(indices)


def _data(path: Path, recipe: Recipe) -> None:
    """Rendered train-split scenes as NNNNNN.png + NNNNNN.txt; resumes by skipping written pairs.

    Each scene depends on the seed and its index alone, so the pairs are the same whatever the
    order: with many scenes to write, one process per CPU core (at most 8) writes them in chunks.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    path.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(recipe.examples) if not (path / f"{i:06d}.txt").is_file()]
    chunks = [todo[k : k + RENDER_CHUNK] for k in range(0, len(todo), RENDER_CHUNK)]
    processes = min(os.cpu_count() or 1, 8, len(chunks)) if len(todo) >= RENDER_PROCESSES_FROM else 1
    bar = tqdm(total=recipe.examples, initial=recipe.examples - len(todo), desc="data", unit="scene",
               dynamic_ncols=True)  # fmt: skip
    with bar:
        if processes == 1:
            for chunk in chunks:
                bar.update(_render_pairs(str(path), recipe.seed, recipe.image_size, chunk))
        else:  # spawned: the parent may hold torch's threads, which a fork would copy mid-state
            with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
                jobs = [
                    pool.submit(_render_pairs, str(path), recipe.seed, recipe.image_size, c) for c in chunks
                ]
                for job in jobs:
                    bar.update(job.result())
    (path / "DONE").write_text(f"{recipe.examples}\n")


def _features(out: Path, recipe: Recipe) -> None:
    from ..extract import ExtractConfig, extract

    config = ExtractConfig(
        model=str(out / "components"),
        data=str(out / "data"),
        out=str(out / "features"),
        resolution=recipe.image_size,
        batch_size=256,
        shard_size=10_000,
        data_type=0,
        device=recipe.device,
        save_dtype="fp32",
        workers=0 if recipe.device == "cpu" else 4,  # on a GPU, threads decode the pictures ahead
    )
    extract(config)
    (out / "features" / "DONE").write_text("done\n")


def _train_config(out: Path, recipe: Recipe, stage: str, **fields: Any) -> TrainConfig:
    """A U-ViT training run of the recipe into ``out/stage``, on ``out/features``, resumable; the
    features are read into memory when they fit (the same batches as from the files, at less cost
    a step)."""
    from ..training.data import fits_in_memory

    common = dict(
        data=str(out / "features"),
        data_in_memory=fits_in_memory(out / "features"),
        output_dir=str(out / stage),
        batch_size=recipe.uvit_batch,
        ema_decay=recipe.ema_decay,
        checkpoint_every=recipe.checkpoint_every,
        keep_last=2,
        log_every=50,
        mixed_precision=recipe.precision,
        snr_gamma=recipe.snr_gamma,
        resume=True,
    )
    return TrainConfig(**common, **fields)


def _uvit(out: Path, recipe: Recipe) -> None:
    from ..pipeline import UniDiffuser
    from ..training.trainer import train

    network = UniDiffuser.from_pretrained(out / "components").network
    config = _train_config(
        out,
        recipe,
        "uvit",
        model=network.config.to_dict(),
        steps=recipe.uvit_steps,
        lr=recipe.uvit_lr,
        warmup_steps=recipe.uvit_warmup,
        decay_steps=recipe.uvit_decay,
        seed=recipe.seed,
        components=str(out / "components"),
        sample_every=recipe.checkpoint_every * 2,
        sample_prompts=SHAPES_PROMPTS,
        sample_steps=20,
    )
    train(config)
    (out / "uvit" / "DONE").write_text("done\n")


def tune_configs(out: Path, recipe: Recipe) -> list[TrainConfig]:
    """The tune stage's training runs, in order: ``unidiffuser train --init-from OUT/uvit
    --clean-prob ...`` up to step ``tune_weigh_from``, then the same run resumed up to
    ``tune_text_from`` with ``--loss-weight img=W``, then up to ``tune_steps`` with
    ``--loss-weight img=W --loss-weight text=V``. A phase with no steps is left out."""
    img = min(recipe.tune_weigh_from, recipe.tune_steps)
    text = min(recipe.tune_text_from, recipe.tune_steps)
    image = {"img": recipe.tune_img_weight}
    phases = [
        (0, img, {}),
        (img, text, image),
        (text, recipe.tune_steps, {**image, "text": recipe.tune_text_weight}),
    ]
    return [
        _train_config(
            out,
            recipe,
            "tune",
            init_from=str(out / "uvit"),  # a run directory: the EMA of its newest checkpoint
            steps=end,
            lr=recipe.tune_lr,
            warmup_steps=min(100, end),
            decay_steps=min(recipe.tune_decay, end - start),
            clean_prob=recipe.tune_clean_prob,
            loss_weights=weights,
            seed=recipe.seed + 1,  # its own data order and noise, not the uvit stage's again
        )
        for start, end, weights in phases
        if end > start
    ]


def _tune(out: Path, recipe: Recipe) -> None:
    from ..training.trainer import train

    for config in tune_configs(out, recipe):  # the second resumes the first's newest checkpoint
        train(config)
    (out / "tune").mkdir(parents=True, exist_ok=True)
    (out / "tune" / "DONE").write_text("done\n")


def _model(out: Path, recipe: Recipe) -> None:
    from ..pipeline import UniDiffuser
    from ..training.checkpoint import latest_checkpoint, load_weights

    run = out / ("tune" if recipe.tune_steps else "uvit") / "checkpoints"
    pipe = UniDiffuser.from_pretrained(out / "components")
    pipe.network.load_state_dict(load_weights(latest_checkpoint(run)), strict=True)
    pipe.save_pretrained(out / "model")


__all__ = [
    "FROZEN_STAGES",
    "PRESETS",
    "SHAPES_PROMPTS",
    "STAGES",
    "Recipe",
    "decoder_architecture",
    "frozen_source",
    "network_config",
    "parse_options",
    "recipe_options",
    "run_recipe",
    "tune_configs",
]
