"""The UniDiffuser pipeline: strings and pictures in, strings and pictures out, for every task.

The pipeline joins the network (``network.py``), the tasks and solvers (``tasks.py``) and four
frozen components (``components/``):

    prompt --CLIP text--> (77, 768) --caption decoder encode--> text latent (77, 64)
    image  --VAE encode (sampled)--> image latent (4, H/8, W/8)   } the "image" group
    image  --CLIP image--> image embedding (512)                  }
    text latent --caption decoder beam search--> caption
    image latent --VAE decode--> image

Every method takes a seed and draws all its noise from one CPU generator, so a seed gives the
same result on any device. An optional fifth component, a whole CLIP (``components/scorer.py``),
ranks candidates where a call asks for the best of several (``best_of``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .components.images import load_image, resize_and_crop, to_pil, to_tensor
from .fast import FastNetwork, recorded_input_amax
from .network import UViT
from .schedule import NoiseSchedule
from .solvers import DEFAULT_SOLVER, check_grid, official_orders, sample_ddim, time_grid
from .tasks import TASKS, TaskModel, generate, generate_chain

ImageInput = Image.Image | str | Path
DEFAULT_GUIDANCE_SCALE = 7.0  # the released model's; a model directory may name its own
Progress = Callable[[int, int], None]  # (steps done, steps in all), after each solver step


@dataclass
class Output:
    """What a pipeline call returns: images, captions and, on request, the latents."""

    images: list[Image.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    latents: dict[str, Tensor] | None = None

    def select(self, indices: Sequence[int]) -> Output:
        """The outputs at ``indices`` (images, captions and latents alike), in that order."""
        return Output(
            images=[self.images[i] for i in indices] if self.images else [],
            texts=[self.texts[i] for i in indices] if self.texts else [],
            latents={k: v[list(indices)] for k, v in self.latents.items()}
            if self.latents is not None
            else None,
        )


class UniDiffuser:
    """Every UniDiffuser task over one network and its components.

    Args:
        network: the U-ViT with groups "image" (modalities img, clip_img) and "text" (text).
        autoencoder: image pixels <-> image latents (components.autoencoder.ImageAutoencoder).
        image_encoder: images -> CLIP image embeddings (components.clip.ClipImageEmbedder).
        text_encoder: strings -> CLIP text features (components.clip.ClipTextEncoder).
        caption_decoder: features -> text latents and text latents -> strings
            (components.caption.CaptionDecoder).
        schedule: the noise schedule (Stable Diffusion's by default).
        data_type: v1's data_type label for sampling (1: the curated data the released model
            prefers); ignored by models without that label.
        guidance_scale: the guidance scale of every call that does not give one (7, the released
            default, unless the model directory's ``unidiffuser.json`` names its own).
        grid: the solvers' time grid for every sampling call: "time" (uniform in t, the released
            sampler's) or "logsnr" (uniform in log-SNR); the model directory may name its own.
        scorer: a whole CLIP (components.scorer.ClipScorer) that ranks the candidates of calls
            with ``best_of`` > 1; None: such calls are refused.
    """

    def __init__(
        self,
        network: UViT,
        autoencoder,
        image_encoder,
        text_encoder,
        caption_decoder,
        *,
        schedule: NoiseSchedule | None = None,
        data_type: int = 1,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        grid: str = "time",
        scorer=None,
    ):
        cfg = network.config
        names = {m.name for m in cfg.modalities}
        if {"img", "clip_img", "text"} - names or set(cfg.groups) != {"image", "text"}:
            raise ValueError(
                "network: the pipeline needs the image-text layout (groups image and text; modalities "
                f"img, clip_img, text), got groups {cfg.groups} and modalities {sorted(names)}"
            )
        self.network = network.eval()
        self.autoencoder = autoencoder
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.caption_decoder = caption_decoder
        self.scorer = scorer
        self.schedule = schedule or NoiseSchedule()
        self.data_type = data_type
        self.guidance_scale = guidance_scale
        self.grid = grid
        img = cfg.modality("img")
        self.latent_channels, self.latent_size = img.shape[0], img.shape[1:]
        self.downsample = autoencoder.config.downsample  # 8 for KL-f8
        self.patch_pixels = img.patch_size * self.downsample  # sizes must be multiples of this
        self._fast: FastNetwork | None = None
        self._fast_captions: bool | None = None  # enable_fast_sampling's choice; None: automatic
        self._compile_captions = False

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of every call that does not give one (checked when set)."""
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        self._guidance_scale = check_guidance_scale(value, "guidance_scale")

    @property
    def grid(self) -> str:
        """The solvers' time grid of every sampling call: "time" or "logsnr" (checked when set)."""
        return self._grid

    @grid.setter
    def grid(self, value: str) -> None:
        self._grid = check_grid(value, "pipe.grid")

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scorer: str | Path | None = None,
    ):
        """Load a model directory in any supported layout (ours, the release files, diffusers).

        ``scorer``: a whole CLIP checkpoint's local directory to rank ``best_of`` candidates with;
        None: the model directory's own ``scorer/`` where it has one.
        """
        from .loading import load_pipeline

        return load_pipeline(path, device=device, dtype=dtype, scorer=scorer)

    def save_pretrained(self, path: str | Path) -> None:
        """Write our format: one safetensors file or folder per component and a JSON config."""
        from .loading import save_pipeline

        save_pipeline(self, path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> UniDiffuser:
        """Every part on ``device`` (cpu, cuda, cuda:N or auto) in ``dtype`` (torch.float32,
        torch.bfloat16 or torch.float16); None keeps what is there."""
        device, dtype = check_placement(device, dtype)
        for part in (
            self.network,
            self.autoencoder,
            self.image_encoder,
            self.text_encoder,
            self.caption_decoder,
            *([self.scorer] if self.scorer is not None else []),
        ):
            part.to(device=device, dtype=dtype)
        if self._fast is not None:  # compiled and captured for the old device and dtype: start again
            fast = self._fast
            self._fast = FastNetwork(
                self.network,
                compile=fast.compile,
                cuda_graphs=fast.cuda_graphs,
                fp8=fast.fp8,
                fp8_amax=fast.fp8_amax,
                loop_graphs=fast.loop_graphs,
                attention=fast.attention,
                backend=fast.backend,
            )
            self._set_fast_captions()  # the search's buffers and graphs belong to the old device and dtype
        return self

    # -- speed ----------------------------------------------------------------------------------

    def enable_fast_sampling(
        self,
        *,
        compile: bool = True,
        cuda_graphs: bool = True,
        fp8: bool | str = False,
        fp8_calibration: Callable[[UniDiffuser], object] | None = None,
        loop_graphs: bool = True,
        attention: str | None = None,
        channels_last: bool = True,
        compile_autoencoder: bool | None = None,
        fast_captions: bool | None = None,
        compile_captions: bool | None = None,
        backend: str = "inductor",
    ) -> UniDiffuser:
        """Sample through a compiled, graph-captured network (opt-in; see ``fast.FastNetwork``).

        The first call at each batch size and image size compiles and captures (tens of seconds
        for the released network on a GPU); later calls at that shape replay. Results equal the
        plain path's up to rounding (``fp8=True``: up to fp8's precision).

        Args:
            compile: ``torch.compile`` the network's forward.
            cuda_graphs: capture the forward as CUDA graphs (on CUDA devices only).
            fp8: the transformer blocks' linear layers in fp8 (Hopper and Ada GPUs, or the CPU):
                True, or "row" / "tensor" / "static" to choose the scales (``fast.Fp8Linear``).
            fp8_calibration: with ``fp8="static"``, a function that samples with this pipeline,
                e.g. ``lambda pipe: pipe.text_to_image(["a prompt"])``; it runs once, on the plain
                network, and the largest input each fp8 layer sees there becomes its fixed scale.
                None: ``calibrate_on_every_task`` (joint, then text-to-image from its caption and
                image-to-text from its picture, 50 steps each at the default guidance).
            loop_graphs: with CUDA graphs, capture each whole sampling loop (network calls and
                solver updates) as one graph; calls with a ``progress`` callback step through
                the loop instead, one captured forward per step.
            attention: the network's attention kernel ("cudnn", "flash", "efficient", "math");
                None lets PyTorch choose (``fast.FastNetwork``).
            channels_last: the autoencoder in the channels-last layout.
            compile_autoencoder: ``torch.compile`` the image decoder (one compilation per
                latent shape). None (the default): with ``compile``, on a CUDA device.
            fast_captions: the caption beam search over a fixed-size KV cache, one CUDA graph
                replay per token (``CaptionDecoder.enable_fast_search``). None (the default): on
                where CUDA graphs run, since on the CPU it saves nothing over the growing cache.
            compile_captions: with the fixed-cache search, ``torch.compile`` its step (one
                compilation per batch size). None (the default): with ``compile``, on a CUDA device.
            backend: the ``torch.compile`` backend.

        Returns:
            self.
        """
        amax = None
        if fp8 == "static":
            if fp8_calibration is None:
                fp8_calibration = calibrate_on_every_task
            self.disable_fast_sampling()  # calibrate on the plain network
            with recorded_input_amax(self.network) as amax:
                fp8_calibration(self)
        elif fp8_calibration is not None:
            raise ValueError(f"fp8_calibration goes with fp8='static', not fp8={fp8!r}")
        self._fast = FastNetwork(
            self.network, compile=compile, cuda_graphs=cuda_graphs, fp8=fp8, fp8_amax=amax,
            loop_graphs=loop_graphs, attention=attention, backend=backend,
        )  # fmt: skip
        self.autoencoder.to_channels_last(channels_last)
        if compile_autoencoder is None:
            compile_autoencoder = compile and self.device.type == "cuda"
        self.autoencoder.compile_decoder(compile_autoencoder, backend=backend)
        if compile_captions is None:
            compile_captions = compile and self.device.type == "cuda"
        self._fast_captions, self._compile_captions = fast_captions, compile_captions
        self._set_fast_captions()
        return self

    def disable_fast_sampling(self) -> UniDiffuser:
        """Back to the plain network (the compiled functions and graphs are dropped); returns self."""
        self._fast = None
        self.autoencoder.to_channels_last(False)
        self.autoencoder.compile_decoder(False)
        self._set_fast_captions()
        return self

    def _set_fast_captions(self) -> None:
        """The caption search that goes with the sampling path (see ``enable_fast_sampling``)."""
        fast = self._fast
        graphs = fast is not None and fast.cuda_graphs and self.device.type == "cuda"
        wanted = graphs if self._fast_captions is None else self._fast_captions
        if fast is not None and wanted:
            self.caption_decoder.enable_fast_search(
                cuda_graphs=fast.cuda_graphs, compile=self._compile_captions, backend=fast.backend
            )
        else:
            self.caption_decoder.disable_fast_search()

    @property
    def sampler(self) -> UViT | FastNetwork:
        """What the tasks call: the network, or its fast forward after ``enable_fast_sampling``."""
        return self._fast if self._fast is not None else self.network

    @property
    def device(self) -> torch.device:
        return self.network.device

    # -- encoders and decoders ------------------------------------------------------------------

    @property
    def default_size(self) -> tuple[int, int]:
        """Pixel size the network was trained at (height, width)."""
        return (self.latent_size[0] * self.downsample, self.latent_size[1] * self.downsample)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The pixel size a call would sample at (None: the trained size), or a ValueError."""
        h, w = self.default_size
        h, w = h if height is None else height, w if width is None else width
        step = self.patch_pixels
        for name, value in (("height", h), ("width", w)):
            if not isinstance(value, int) or isinstance(value, bool) or value < step or value % step:
                raise ValueError(f"{name}={value!r}: expected a positive multiple of {step} pixels")
        return h, w

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Strings -> text latents (B, 77, prefix_dim)."""
        prompts = _check_prompts(prompts, "prompts")
        features = self.text_encoder(prompts)
        return self.caption_decoder.encode(features.to(self.device)).float()

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageInput], generator: torch.Generator, size: tuple[int, int] | None = None
    ) -> dict[str, Tensor]:
        """Pictures -> the image group: VAE latents (posterior sampled) and CLIP embeddings."""
        h, w = size or self.default_size
        # one crop for both encoders: CLIP sees the picture the autoencoder sees, as released
        pil = self.pictures(images, (h, w))
        pixels = to_tensor(pil, (h, w)).to(self.device)
        latents = self.autoencoder.encode(pixels, generator=generator)
        embeds = self.image_encoder(pil)
        return {"img": latents.float(), "clip_img": embeds.to(self.device).float()}

    def pictures(
        self, images: Sequence[ImageInput], size: tuple[int, int] | None = None
    ) -> list[Image.Image]:
        """Pictures or paths -> RGB pictures resized and cropped to ``size`` (the trained size)."""
        if isinstance(images, (str, Path, Image.Image)) or not len(images):
            raise ValueError("images: expected a non-empty list of PIL images or image paths")
        h, w = size or self.default_size
        return [resize_and_crop(load_image(im), (h, w)) for im in images]

    @torch.no_grad()
    def decode_images(self, latents: Tensor) -> list[Image.Image]:
        return to_pil(self.autoencoder.decode(latents).float().cpu())

    @torch.no_grad()
    def decode_texts(self, text_latents: Tensor) -> list[str]:
        return self.caption_decoder.generate(text_latents)

    # -- sampling -------------------------------------------------------------------------------

    def _labels(self) -> dict[str, int]:
        return {m.name: self.data_type for m in self.network.config.labels}

    def _sampling_args(self, steps, guidance_scale, solver, progress, height, width) -> dict:
        h, w = self.check_size(height, width)
        if guidance_scale is None:
            guidance_scale = self.guidance_scale
        callback = None
        if progress is not None and not callable(progress):
            raise ValueError(f"progress={progress!r}: expected a function (steps done, steps in all) or None")
        if progress is not None:
            # counted in model evaluations, as `steps` is; a step of the order-3 solver makes up to three
            orders = official_orders(steps) if solver == "dpm++3s" else [1] * steps
            reached = list(itertools.accumulate(orders))
            callback = lambda i, t, x: progress(reached[i], steps)  # noqa: E731
        return dict(
            steps=steps, solver=solver, grid=self.grid, guidance_scale=guidance_scale, callback=callback,
            labels=self._labels(), sizes={"img": (h // self.downsample, w // self.downsample)},
        )  # fmt: skip

    def _empty(self, guidance: str, negative_prompt: str | None, batch: int) -> tuple[str, dict | None]:
        """The guidance mode and the empty-condition text latent for text-conditioned tasks."""
        if negative_prompt is not None:
            if guidance not in ("uncond", "empty"):
                raise ValueError(f"guidance={guidance!r}: expected 'uncond' or 'empty'")
            return "empty", {"text": self.encode_prompts([negative_prompt]).expand(batch, -1, -1)}
        if guidance == "empty":
            return "empty", {"text": self.encode_prompts([""]).expand(batch, -1, -1)}
        if guidance != "uncond":
            raise ValueError(
                f"guidance={guidance!r}: expected 'uncond' (condition absent) or 'empty' (empty prompt)"
            )
        return "uncond", None

    def _finish(self, out: dict[str, Tensor], return_latents: bool) -> Output:
        result = Output(latents={k: v.cpu() for k, v in out.items()} if return_latents else None)
        if "img" in out:
            result.images = self.decode_images(out["img"])
        if "text" in out:
            result.texts = self.decode_texts(out["text"])
        return result

    def check_best_of(self, best_of) -> int:
        """``best_of`` as a count of candidates this pipeline can rank, or a ValueError that says why not."""
        if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
            raise ValueError(f"best_of={best_of!r}: expected an integer >= 1 (1 keeps every sample as drawn)")
        if best_of > 1 and self.scorer is None:
            raise ValueError(
                f"best_of={best_of} ranks candidates with a CLIP scorer, and this pipeline has none: load "
                "a model directory that has a scorer/ folder, pass scorer=DIR (a whole CLIP checkpoint, "
                "e.g. openai/clip-vit-base-patch32 downloaded beforehand) to UniDiffuser.from_pretrained, "
                "or set pipe.scorer = ClipScorer.from_pretrained_dir(DIR)"
            )
        return best_of

    @staticmethod
    def _each(embeddings: Tensor, result: Output) -> Tensor:
        """Embeddings of the inputs, each repeated for its run of outputs in ``result``."""
        count = len(result.images or result.texts)
        return embeddings.repeat_interleave(count // embeddings.shape[0], dim=0)

    def _keep_best(self, result: Output, best_of: int, score: Callable[[Output], Tensor]) -> Output:
        """Of each run of ``best_of`` consecutive candidates, the one ``score`` rates highest."""
        if best_of == 1:
            return result
        scores = score(result).float().cpu().view(-1, best_of)
        first = torch.arange(scores.shape[0]) * best_of
        return result.select((first + scores.argmax(1)).tolist())

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: str | Sequence[str],
        *,
        num_samples: int = 1,
        steps: int = 50,
        guidance_scale: float | None = None,
        guidance: str = "uncond",
        negative_prompt: str | None = None,
        seed: int | None = 0,
        height: int | None = None,
        width: int | None = None,
        solver: str = DEFAULT_SOLVER,
        return_latents: bool = False,
        progress: Progress | None = None,
        best_of: int = 1,
    ) -> Output:
        """Images for each prompt (num_samples each, prompt-major order).

        Args:
            guidance_scale: s in (1 + s) cond - s uncond; None: the model's (``self.guidance_scale``).
            guidance: "uncond" (the text made absent) or "empty" (the empty prompt at t = 0).
            negative_prompt: a prompt to steer away from (used as the unconditional text).
            height, width: output pixels, multiples of 16 (the trained size by default).
            best_of: draw this many images for each one returned and keep the one the scorer finds
                nearest its prompt (``best_of`` times the work; the draws are those of
                ``num_samples * best_of`` samples).
        """
        best_of = self.check_best_of(best_of)
        asked = _check_prompts(prompts, "prompts")
        prompts = _repeat(asked, num_samples, best_of)
        gen = _generator(seed)
        mode, empty = self._empty(guidance, negative_prompt, len(prompts))
        out = generate(
            self.sampler, self.schedule, "t2i", given={"text": self.encode_prompts(prompts)},
            guidance=mode, empty=empty, generator=gen,
            **self._sampling_args(steps, guidance_scale, solver, progress, height, width),
        )  # fmt: skip
        return self._keep_best(
            self._finish(out, return_latents),
            best_of,
            lambda r: _cosine(
                self.scorer.embed_images(r.images), self._each(self.scorer.embed_texts(asked), r)
            ),
        )

    @torch.no_grad()
    def image_to_text(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        num_samples: int = 1,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        solver: str = DEFAULT_SOLVER,
        return_latents: bool = False,
        progress: Progress | None = None,
        best_of: int = 1,
    ) -> Output:
        """Captions for each image (num_samples each); guidance makes the image absent.

        ``best_of``: draw this many captions for each one returned and keep the one the scorer
        finds nearest its image.
        """
        best_of = self.check_best_of(best_of)
        gen = _generator(seed)
        pictures = self.pictures(_as_list(images))
        given = self.encode_images(_repeat(pictures, num_samples, best_of), gen)
        out = generate(
            self.sampler, self.schedule, "i2t", given=given, generator=gen,
            **self._sampling_args(steps, guidance_scale, solver, progress, None, None),
        )  # fmt: skip
        return self._keep_best(
            self._finish(out, return_latents),
            best_of,
            lambda r: _cosine(
                self._each(self.scorer.embed_images(pictures), r), self.scorer.embed_texts(r.texts)
            ),
        )

    @torch.no_grad()
    def joint(
        self,
        num_samples: int = 1,
        *,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        height: int | None = None,
        width: int | None = None,
        solver: str = DEFAULT_SOLVER,
        return_latents: bool = False,
        progress: Progress | None = None,
        best_of: int = 1,
    ) -> Output:
        """Image-caption pairs from the joint distribution.

        ``best_of``: draw this many pairs for each one returned and keep the pair whose picture and
        caption the scorer finds nearest each other.
        """
        best_of = self.check_best_of(best_of)
        _check_num_samples(num_samples)
        result = self._unconditional(
            "joint", num_samples * best_of, steps, guidance_scale, seed, height, width, solver, return_latents,
            progress,
        )  # fmt: skip
        return self._keep_best(
            result,
            best_of,
            lambda r: _cosine(self.scorer.embed_images(r.images), self.scorer.embed_texts(r.texts)),
        )

    @torch.no_grad()
    def image(self, num_samples: int = 1, *, steps: int = 50, seed: int | None = 0, height: int | None = None,
              width: int | None = None, solver: str = DEFAULT_SOLVER, return_latents: bool = False,
              progress: Progress | None = None) -> Output:  # fmt: skip
        """Images from the image marginal (the text absent)."""
        return self._unconditional(
            "i", num_samples, steps, 0.0, seed, height, width, solver, return_latents, progress
        )

    @torch.no_grad()
    def text(self, num_samples: int = 1, *, steps: int = 50, seed: int | None = 0, solver: str = DEFAULT_SOLVER,
             return_latents: bool = False, progress: Progress | None = None) -> Output:  # fmt: skip
        """Captions from the text marginal (the image absent)."""
        return self._unconditional(
            "t", num_samples, steps, 0.0, seed, None, None, solver, return_latents, progress
        )

    def _unconditional(
        self, task, num_samples, steps, guidance_scale, seed, height, width, solver, return_latents, progress
    ):
        _check_num_samples(num_samples)
        out = generate(
            self.sampler, self.schedule, task, batch_size=num_samples, generator=_generator(seed),
            **self._sampling_args(steps, guidance_scale, solver, progress, height, width),
        )  # fmt: skip
        return self._finish(out, return_latents)

    @torch.no_grad()
    def image_variation(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        num_samples: int = 1,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        solver: str = DEFAULT_SOLVER,
        return_latents: bool = False,
        best_of: int = 1,
    ) -> Output:
        """Image -> text latent -> image (i2t2i); the caption latent is passed straight on.

        ``best_of``: draw this many images for each one returned and keep the one the scorer finds
        nearest the source image.
        """
        best_of = self.check_best_of(best_of)
        gen = _generator(seed)
        pictures = self.pictures(_as_list(images))
        given = self.encode_images(_repeat(pictures, num_samples, best_of), gen)
        out = generate_chain(
            self.sampler, self.schedule, "i2t2i", given=given, generator=gen,
            **self._sampling_args(steps, guidance_scale, solver, None, None, None),
        )  # fmt: skip
        return self._keep_best(
            self._finish(out, return_latents),
            best_of,
            lambda r: _cosine(
                self._each(self.scorer.embed_images(pictures), r), self.scorer.embed_images(r.images)
            ),
        )

    @torch.no_grad()
    def text_variation(
        self,
        prompts: str | Sequence[str],
        *,
        num_samples: int = 1,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        solver: str = DEFAULT_SOLVER,
        return_latents: bool = False,
        best_of: int = 1,
    ) -> Output:
        """Text -> image latents -> text (t2i2t); the image latents are passed straight on.

        ``best_of``: draw this many captions for each one returned and keep the one the scorer
        finds nearest the prompt.
        """
        best_of = self.check_best_of(best_of)
        asked = _check_prompts(prompts, "prompts")
        prompts = _repeat(asked, num_samples, best_of)
        out = generate_chain(
            self.sampler, self.schedule, "t2i2t", given={"text": self.encode_prompts(prompts)},
            generator=_generator(seed), **self._sampling_args(steps, guidance_scale, solver, None, None, None),
        )  # fmt: skip
        return self._keep_best(
            self._finish(out, return_latents),
            best_of,
            lambda r: _cosine(
                self._each(self.scorer.embed_texts(asked), r), self.scorer.embed_texts(r.texts)
            ),
        )

    @torch.no_grad()
    def hop(
        self,
        start: ImageInput | str,
        *,
        hops: int = 4,
        steps: int = 50,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        solver: str = DEFAULT_SOLVER,
    ) -> Output:
        """Hop between modalities: image -> text -> image ... (or text -> image -> ...), hops times.

        Returns every image and caption produced along the way, in order.
        """
        if not isinstance(hops, int) or hops < 1:
            raise ValueError(f"hops={hops!r}: expected an integer >= 1")
        gen = _generator(seed)
        if _is_prompt(start):
            given, first = {"text": self.encode_prompts([start])}, "t2i"
        else:
            given, first = self.encode_images([start], gen), "i2t"
        order = [first, "i2t" if first == "t2i" else "t2i"]
        tasks = [order[i % 2] for i in range(hops)]
        result = Output()

        def keep(_: int, out: dict[str, Tensor]) -> None:
            if "img" in out:
                result.images.extend(self.decode_images(out["img"]))
            if "text" in out:
                result.texts.extend(self.decode_texts(out["text"]))

        generate_chain(
            self.sampler, self.schedule, tasks, given=given, generator=gen, on_stage=keep,
            **self._sampling_args(steps, guidance_scale, solver, None, None, None),
        )  # fmt: skip
        return result

    @torch.no_grad()
    def interpolate(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        frames: int = 5,
        steps: int = 50,
        seed: int | None = 0,
        return_latents: bool = False,
    ) -> Output:
        """Images between two real images.

        Both images are captioned (i2t), then inverted to noise with the deterministic DDIM ODE of
        the text-to-image task conditioned on their own caption latent; the noises are joined by
        spherical interpolation and the caption latents linearly, and each frame is sampled back
        with the same ODE (no guidance, which would break the inversion).
        """
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames={frames!r}: expected an integer >= 2")
        gen = _generator(seed)
        images = self.encode_images([image_a, image_b], gen)
        labels = self._labels()
        text = generate(
            self.sampler,
            self.schedule,
            "i2t",
            given=images,
            labels=labels,
            steps=steps,
            grid=self.grid,
            generator=gen,
        )["text"]
        fn = TaskModel(self.sampler, self.schedule, TASKS["t2i"], given={"text": text}, labels=labels)
        grid = time_grid(self.schedule, steps, self.grid)  # 1 -> 1e-3
        noise = fn.layout.unpack(sample_ddim(fn, fn.layout.pack(images), grid.flip(0), self.schedule))
        weights = torch.linspace(0, 1, frames)
        x_T = {k: torch.stack([_slerp(v[0], v[1], float(w)) for w in weights]) for k, v in noise.items()}
        texts = torch.stack([torch.lerp(text[0], text[1], float(w)) for w in weights])
        back = TaskModel(self.sampler, self.schedule, TASKS["t2i"], given={"text": texts}, labels=labels)
        out = back.layout.unpack(sample_ddim(back, back.layout.pack(x_T), grid, self.schedule))
        return self._finish({"img": out["img"]}, return_latents)

    def __call__(self, mode: str, **kwargs) -> Output:
        """Dispatch by mode name: t2i, i2t, joint, i, t, i2t2i, t2i2t, interp."""
        methods = {
            "t2i": self.text_to_image, "i2t": self.image_to_text, "joint": self.joint, "i": self.image,
            "t": self.text, "i2t2i": self.image_variation, "t2i2t": self.text_variation,
            "interp": self.interpolate,
        }  # fmt: skip
        if mode not in methods:
            raise ValueError(f"mode={mode!r}: expected one of {sorted(methods)}")
        return methods[mode](**kwargs)


def calibrate_on_every_task(pipe: UniDiffuser, *, steps: int = 50, seed: int = 0) -> None:
    """The default calibration of static fp8 scales: one joint sample, then text-to-image from its
    caption and image-to-text from its picture, each at the pipeline's default guidance and size.

    It needs no prompt or picture of the user's, so it fits any model; the three cover every kind
    of network call the tasks make (both modalities generated, and each one given clean).
    """
    pair = pipe.joint(steps=steps, seed=seed)
    pipe.text_to_image(pair.texts, steps=steps, seed=seed)
    pipe.image_to_text(pair.images, steps=steps, seed=seed)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_placement(device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    """``device`` resolved (``devices.resolve_device``) and ``dtype`` checked, or a ValueError
    naming the fix; None stays None."""
    from .devices import resolve_device

    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected torch.float32, torch.bfloat16 or torch.float16")
    return (None if device is None else resolve_device(device)), dtype


def check_guidance_scale(value, where: str) -> float:
    """A model's default guidance scale as a float, or a ValueError that says what ``where`` holds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{where}={value!r}: expected a finite number >= 0 ({DEFAULT_GUIDANCE_SCALE:g} is the "
            "released model's default)"
        )
    return float(value)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of two (B, D) batches of unit vectors -> (B,)."""
    return (a * b).sum(-1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer below 2**63, or None")
    else:
        gen.manual_seed(seed)
    return gen


def _check_prompts(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name}: expected a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name}: expected at least one string")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name}: expected strings, got {bad[:3]}")
    return prompts


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _is_prompt(start) -> bool:
    """Whether ``hop`` starts from text: a string that names no file and ends in no image suffix
    (a missing "photo.png" is a missing image, not a prompt); an image or a Path is a picture."""
    if not isinstance(start, str):
        return False
    if not start.strip():
        raise ValueError("start: an empty string; give a prompt, an image or an image file")
    return not Path(start).is_file() and Path(start).suffix.lower() not in IMAGE_SUFFIXES


def _as_list(images) -> list:
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images)


def _check_num_samples(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_samples={n!r}: expected an integer >= 1")


def _repeat(items: list, n: int, best_of: int = 1) -> list:
    """Each item ``n * best_of`` times in a row (its samples, each drawn as ``best_of`` candidates)."""
    _check_num_samples(n)
    return [item for item in items for _ in range(n * best_of)]


def _slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation of two noise tensors (keeps their norm, unlike a straight line)."""
    cos = ((a * b).sum() / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:
        return torch.lerp(a, b, w)
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / math.sin(float(theta))
