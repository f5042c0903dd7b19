"""Load a model once, then turn requests into images: tokenize -> encode -> sample -> decode.

Each stage is a short tensor-in, tensor-out method so it can be tested alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from sdcli import inpaint
from sdcli.config import ModelConfig
from sdcli.embeddings import Embedding, check_fits, read_embedding
from sdcli.errors import RequestError
from sdcli.hashing import cache_dir
from sdcli.images import image_tensor, pixels, read_image, to_pil
from sdcli.nets.bands import decode_in_bands, encode_in_bands
from sdcli.nets.text import Tokenizer
from sdcli.nets.unet import timestep_embedding
from sdcli.prompt_chunks import CHUNK_TOKENS, Chunk, Trigger, chunk_prompt
from sdcli.request import Request, check_request
from sdcli.samplers import evaluations, per_image_noise, sample, start_step
from sdcli.weights import Components, load_components, vae_dtype

log = logging.getLogger("sdcli")

# Read before anything imports torch._dynamo, which fills the variable in with its /tmp default.
INDUCTOR_CACHE_CHOSEN = "TORCHINDUCTOR_CACHE_DIR" in os.environ
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; anything else must name a device that exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RequestError(f"unknown device '{name}'; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RequestError(f"device '{name}' is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RequestError("device 'mps' is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RequestError(f"unknown device '{name}'; expected auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on GPUs and fp32 on the CPU (where fp32 is exact against the reference)."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise RequestError(f"unknown dtype '{name}'; expected auto, fp32, fp16 or bf16")
    return DTYPES[name]


def layouts(device: torch.device, dtype: torch.dtype) -> tuple[torch.memory_format, torch.memory_format]:
    """(U-Net, VAE) activation layouts. NHWC is oneDNN's and cuDNN's native conv layout; on a 2-core AVX-512
    CPU it made the fp32 VAE decode 5-10% faster and bf16 convs up to 1.8x faster, but the fp32 U-Net 3-5%
    slower, so that one stays NCHW (docs/performance.md)."""
    if device.type not in ("cpu", "cuda"):
        return torch.contiguous_format, torch.contiguous_format
    unet = torch.contiguous_format if device.type == "cpu" and dtype == torch.float32 else torch.channels_last
    return unet, torch.channels_last


def compiled(unet: torch.nn.Module) -> Callable:
    """The U-Net through torch.compile, its weights frozen into the graph (inference only, so inductor may
    fold and prepack them; fp32 stays within 1e-4 relative of eager, not bit-identical). Inductor caches
    the code it generates; keeping that cache in sdcli's cache folder ($SDCLI_HOME/cache or
    $XDG_CACHE_HOME/sdcli) rather than /tmp lets later processes skip minutes of code generation, unless
    TORCHINDUCTOR_CACHE_DIR names another folder."""
    if not INDUCTOR_CACHE_CHOSEN:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    return torch.compile(unet, dynamic=False, options={"freezing": True})


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@dataclass(frozen=True)
class Conditioning:
    """What the U-Net is conditioned on, per image: the cross-attention context (B, T, D) and, for U-Nets
    with label_emb, the vector y (B, adm_in_channels). Classifier-free guidance batches every field as one
    unit, (uncond, cond), into one U-Net call (generative-models' VanillaCFG).

    Long prompts make contexts of 77*k tokens, k differing between images and their negatives. Rows then
    share the call padded to the longest, `lengths` saying how many tokens are each row's own: the U-Net
    attends to those only, which is what A1111 computes by running the two lengths in separate calls."""

    context: torch.Tensor
    vector: torch.Tensor | None = None
    lengths: tuple[int, ...] | None = None  # None: every row is all its own

    @staticmethod
    def of(contexts: Sequence[torch.Tensor], vector: torch.Tensor | None = None) -> Conditioning:
        """Rows of (T_i, D) contexts, padded with zeros to the longest."""
        lengths = tuple(c.shape[0] for c in contexts)
        if len(set(lengths)) == 1:
            return Conditioning(torch.stack(list(contexts)), vector)
        padded = torch.nn.utils.rnn.pad_sequence(list(contexts), batch_first=True)
        return Conditioning(padded, vector, lengths)

    def rows(self) -> list[torch.Tensor]:
        """Each row's own context, without padding."""
        lengths = self.lengths or (self.context.shape[1],) * self.context.shape[0]
        return [row[:n] for row, n in zip(self.context, lengths, strict=True)]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Stack conditionings along the batch."""
        vectors = [p.vector for p in parts]
        vector = None if vectors[0] is None else torch.cat(vectors)
        return Conditioning.of([row for p in parts for row in p.rows()], vector)

    def split(self, n: int) -> tuple[Conditioning, Conditioning]:
        """The first n rows, and the rest."""
        rows = self.rows()
        vector = (None, None) if self.vector is None else (self.vector[:n], self.vector[n:])
        return Conditioning.of(rows[:n], vector[0]), Conditioning.of(rows[n:], vector[1])

    def inputs(self) -> dict[str, torch.Tensor]:
        """The U-Net's keyword arguments."""
        inputs = {"context": self.context} | ({"y": self.vector} if self.vector is not None else {})
        if self.lengths is not None:
            positions = torch.arange(self.context.shape[1], device=self.context.device)
            inputs["context_keys"] = positions < torch.tensor(self.lengths, device=self.context.device)[:, None]
        return inputs


class Pipeline:
    """A loaded model on one device, ready to render."""

    def __init__(
        self, config: ModelConfig, weights: Path, nets: Components, device: torch.device, dtype: torch.dtype,
        *, compile: bool = False, allow_pickle: bool = False,
    ):  # fmt: skip
        self.config = config
        self.allow_pickle = allow_pickle  # pickled embedding files are read (weights-only) as the checkpoint is
        self._embedding_files: dict[str, Embedding] = {}  # read and checked once each, by path
        self.weights = weights
        self.nets = nets
        self.device = device
        self.dtype = dtype
        self.tokenizers = [Tokenizer(cfg) for cfg in config.text]
        self.unet_layout, self.vae_layout = layouts(device, dtype)
        # weights in the activations' layout, so no conv reorders its weight on every call (a no-op for the
        # networks of Pipeline.load, read that way)
        for net, layout in ((nets.unet, self.unet_layout), (nets.vae, self.vae_layout)):
            if layout == torch.channels_last:
                net.to(memory_format=layout)
        self.unet = compiled(nets.unet) if compile else nets.unet

    @classmethod
    def load(
        cls, config: ModelConfig, weights: Path | None = None, device: str = "auto", dtype: str = "auto",
        *, compile: bool = False, allow_pickle: bool = False, vae: Path | None = None,
    ) -> Pipeline:  # fmt: skip
        """Build the three networks straight from the weights file, in their final dtype and device; `compile`
        runs the U-Net through torch.compile (slow first call, cached on disk for the next process); a pickle
        checkpoint loads only with `allow_pickle`, and then without running its code; `vae` is a separate VAE
        file (or diffusers folder) to decode with instead of the checkpoint's."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        path = Path(weights) if weights is not None else config.resolve_weights()
        unet_layout, vae_layout = layouts(torch_device, torch_dtype)
        nets = load_components(
            config, path, torch_device, torch_dtype, allow_pickle=allow_pickle, unet_layout=unet_layout,
            vae_layout=vae_layout, vae=vae,
        )  # fmt: skip
        return cls(config, path, nets, torch_device, torch_dtype, compile=compile, allow_pickle=allow_pickle)

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def vae_dtype_name(self) -> str:
        return dtype_name(vae_dtype(self.config, self.dtype))

    def embeddings_of(self, request: Request) -> list[Embedding]:
        """The request's textual-inversion files, in its order, each once."""
        found = []
        for use in request.embeddings:
            if use.file not in self._embedding_files:
                embedding = read_embedding(Path(use.file), allow_pickle=self.allow_pickle)
                self._embedding_files[use.file] = check_fits(embedding, [t.width for t in self.config.text])
            found.append(self._embedding_files[use.file])
        found = list(dict.fromkeys(found))
        names = [e.name.lower() for e in found]
        doubled = next((name for name in names if names.count(name) > 1), None)
        if doubled is not None:
            raise RequestError(f"two embedding files are named '{doubled}': a prompt could not tell them apart")
        return found

    @torch.inference_mode()
    def encode_prompts(
        self, prompts: Sequence[str], requests: Sequence[Request]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each prompt (read by its request's syntax, clip skip and embeddings) -> its text context (77*k, D),
        every encoder's concatenated along D (SDXL: CLIP-L's 768 then bigG's 1280), and the pooled embeddings
        (B, P) of the encoder that gives one, from each prompt's first chunk (None when no encoder pools)."""
        if any(r.clip_skip > 1 for r in requests) and not any(t.clip_skip for t in self.config.text):
            log.warning("clip skip changes nothing on %s: A1111 applies it to SD 1.x's encoder only", self.config.name)
        embeddings = [self.embeddings_of(r) for r in requests]
        per_encoder, pooled = [], None
        for k, (encoder, tokenizer) in enumerate(zip(self.nets.text, self.tokenizers, strict=True)):
            first_id = self.config.text[k].vocab_size
            read = [
                chunk_prompt(p, tokenizer, r.prompt_syntax, _triggers(e, first_id))
                for p, r, e in zip(prompts, requests, embeddings, strict=True)
            ]
            windows, cut = [chunks for chunks, _ in read], [truncated for _, truncated in read]
            tables = [_vector_table(e, k) for e in embeddings]
            contexts, pool = self._encode_windows(encoder, windows, [r.clip_skip for r in requests], tables)
            per_encoder.append(contexts)
            pooled = pool if pool is not None else pooled
        for prompt, truncated in zip(prompts, cut, strict=True):
            if truncated:
                log.warning("prompt longer than %d tokens was truncated: %.60s...", CHUNK_TOKENS, prompt)
        contexts = [torch.cat(parts, dim=-1) for parts in zip(*per_encoder, strict=True)]
        return contexts, pooled

    def _encode_windows(
        self, encoder: torch.nn.Module, windows: Sequence[Sequence[Chunk]], clip_skips: Sequence[int],
        tables: Sequence[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:  # fmt: skip
        """One encoder over every prompt's chunks (one call per clip skip value), each prompt's embedding vectors
        (`tables`, (E, width) or None) under its ids past the vocabulary, each chunk's emphasis applied as A1111's
        "Original" does: weights multiply the tokens, then the chunk's mean is restored."""
        flat = [(i, chunk) for i, chunks in enumerate(windows) for chunk in chunks]
        outputs: list[torch.Tensor | None] = [None] * len(flat)
        pools: list[torch.Tensor | None] = [None] * len(flat)
        for skip in sorted(set(clip_skips)):
            picked = [j for j, (i, _) in enumerate(flat) if clip_skips[i] == skip]
            ids = torch.tensor([flat[j][1].ids for j in picked], device=self.device)
            pool_at = torch.tensor([flat[j][1].pool_at for j in picked], device=self.device)
            extra = _extra_vectors([tables[flat[j][0]] for j in picked], self.device)
            context, pool = encoder(ids, clip_skip=skip, extra=extra, pool_at=pool_at)
            for row, j in enumerate(picked):
                outputs[j] = _emphasis(context[row], flat[j][1])
                pools[j] = None if pool is None else pool[row]
        contexts, first = [], []
        for i in range(len(windows)):
            rows = [j for j, (owner, _) in enumerate(flat) if owner == i]
            contexts.append(torch.cat([outputs[j] for j in rows]))
            first.append(pools[rows[0]])
        pooled = None if first[0] is None else torch.stack(first)
        return contexts, pooled

    def conditioning(self, prompts: Sequence[str], requests: Sequence[Request]) -> Conditioning:
        """The conditioning of each prompt for the request at the same place (its size feeds SDXL's vector).
        With the config's zero_empty_negative, an empty prompt conditions on zeros (text and pooled alike;
        the sizes still count), as generative-models' force_zero_embeddings and diffusers' default do."""
        contexts, pooled = self.encode_prompts(prompts, requests)
        if self.config.conditioning.zero_empty_negative:
            contexts = [torch.zeros_like(c) if not p else c for c, p in zip(contexts, prompts, strict=True)]
            if pooled is not None:
                empty = torch.tensor([not p for p in prompts], device=self.device)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        if not self.config.conditioning.vector:
            return Conditioning.of(contexts)
        return Conditioning.of(contexts, self.vector(pooled, requests).to(contexts[0].dtype))

    def vector(self, pooled: torch.Tensor | None, requests: Sequence[Request]) -> torch.Tensor:
        """SDXL's y: the configured parts in order, each size pair as Fourier features (sgm's
        ConcatTimestepEmbedderND; diffusers' add_time_ids through add_time_proj). Original and target size
        are the image's own (height, width), the crop (0, 0), as diffusers and A1111 default."""
        dim = self.config.conditioning.size_embed_dim
        sizes = {
            "original_size": [(r.height, r.width) for r in requests],
            "crop_coords_top_left": [(0, 0) for _ in requests],
            "target_size": [(r.height, r.width) for r in requests],
        }
        parts = []
        for part in self.config.conditioning.vector:
            if part == "pooled":
                parts.append(pooled.float())
            else:
                numbers = torch.tensor(sizes[part], dtype=torch.float32, device=self.device)  # (B, 2)
                parts.append(timestep_embedding(numbers.flatten(), dim).reshape(len(requests), 2 * dim))
        return torch.cat(parts, dim=1)

    def initial_noise(self, requests: Sequence[Request], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Per-image seeded CPU noise of the requests' latent size, so an image re-renders alone and on any device."""
        factor, first = self.config.vae.downsample, requests[0]
        shape = (1, self.config.vae.latent_channels, first.height // factor, first.width // factor)
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(noise).to(self.device, self.dtype)

    def guided_model(self, cond: Conditioning, uncond: Conditioning | None, guidance: float) -> Callable:
        """The U-Net with classifier-free guidance in one batched call: (uncond, cond) in, combined out."""
        unet, layout = self.unet, self.unet_layout
        if uncond is None:
            inputs = cond.inputs()
            return lambda x, t: unet(
                x.contiguous(memory_format=layout), t.to(self.device, torch.float32).expand(x.shape[0]), **inputs
            )
        both = Conditioning.cat([uncond, cond]).inputs()

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]).contiguous(memory_format=layout)
            t_in = t.to(self.device, torch.float32).expand(x_in.shape[0])
            out_uncond, out_cond = unet(x_in, t_in, **both).chunk(2)
            return out_uncond + guidance * (out_cond - out_uncond)

        return model

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W) float32 on the CPU; decoded in bands of rows, so memory
        stays near two full-resolution activations at any size, with the whole decode's result."""
        vae = self.nets.vae
        z = latents.to(next(vae.parameters()).dtype) / self.config.vae.scale_factor
        image = decode_in_bands(vae, z.contiguous(memory_format=self.vae_layout))
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents times the scale factor, in the U-Net's dtype: each a sample of
        its posterior drawn from its image's generator (diffusers' retrieve_latents, sample mode), encoded in bands
        of rows as decode decodes."""
        vae = self.nets.vae
        x = images.to(self.device, next(vae.parameters()).dtype).contiguous(memory_format=self.vae_layout)
        mean, logvar = encode_in_bands(vae, x)
        z = mean + torch.exp(0.5 * logvar) * per_image_noise(list(generators), mean)
        return z.to(self.dtype) * self.config.vae.scale_factor

    def init_images(self, requests: Sequence[Request]) -> torch.Tensor:
        """Each request's init image, read and resized to its size: (B, 3, H, W) in [-1, 1]."""
        return torch.cat([image_tensor(read_image(r.init_image[0].file), r.width, r.height) for r in requests])

    @torch.inference_mode()
    def latents(self, requests: Sequence[Request], on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run the sampler for requests that share Request.batch_key(): from noise, or from each one's init image,
        then the hires pass where asked. on_step counts the evaluations of both passes together."""
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise RequestError("requests in one batch must share steps, guidance, sampler, size and image inputs")
        for r in requests:
            check_request(r, self.config)
        start = start_step(first.steps, first.strength, "strength") if first.init_image else 0
        passes = [(requests, start)]
        if first.hires_scale != 1:
            hires = [self.hires_request(r) for r in requests]
            passes.append((hires, start_step(hires[0].steps, hires[0].strength, "hires strength")))
        totals = [evaluations(first.sampler, rs[0].steps, s) for rs, s in passes]
        generators = _generators(requests)
        inpainting = None
        if first.mask or first.pad:
            inpainting = inpaint.inputs(requests, generators, self.encode, self.config, self.device, self.dtype)
            init = inpainting.image_latents if first.strength < 1 else None  # at 1: from noise alone
        else:
            init = self.encode(self.init_images(requests), generators) if first.init_image else None
        x = self.denoise(requests, generators, init, start, _pass_progress(on_step, totals, 0), inpainting)
        if len(passes) == 1:
            return x
        # a second diffusers call: fresh generators of the same seeds, as A1111 re-seeds its hires pass
        hires, hires_start = passes[1]
        generators = _generators(hires)
        init = self.upscale(x, hires, generators)
        return self.denoise(hires, generators, init, hires_start, _pass_progress(on_step, totals, 1))

    def denoise(self, requests: Sequence[Request], generators: Sequence[torch.Generator], init: torch.Tensor | None,
                start: int, on_step: Callable[[int, int], None] | None,
                inpainting: inpaint.Inpainting | None = None) -> torch.Tensor:  # fmt: skip
        """One sampler run at the requests' size, from noise or (init) from step `start`; the noise is drawn after
        the init latents' posterior sample, from the same generators, as diffusers' prepare_latents draws it
        (for inpainting, in its own order: sdcli.inpaint)."""
        first = requests[0]
        prompts = [r.prompt for r in requests]
        if first.guidance == 1.0:
            cond, uncond = self.conditioning(prompts, requests), None
        else:  # prompts and negatives through the text encoders in one batch
            both = self.conditioning(prompts + [r.negative for r in requests], [*requests, *requests])
            cond, uncond = both.split(len(requests))
        model, restore = self.guided_model(cond, uncond, first.guidance), None
        if inpainting is None:
            noise = self.initial_noise(requests, generators)
        else:
            noise = inpainting.noise
            model, restore = inpaint.model_and_restore(model, inpainting)
        return sample(first.sampler, model, noise, first.steps, self.config.schedule, list(generators), on_step, init,
                      start, restore=restore)  # fmt: skip

    def hires_request(self, request: Request) -> Request:
        """The hires pass as an img2img request of its own: the upscaled size (each side int(side * scale), down to
        the latent step, as A1111 sizes it), hires_steps (0: steps) at hires_strength. Its size also conditions
        SDXL, as diffusers' img2img takes the size of the image it is given."""
        step = self.config.vae.downsample
        return dataclasses.replace(
            request, width=int(request.width * request.hires_scale) // step * step,
            height=int(request.height * request.hires_scale) // step * step, steps=request.hires_steps or request.steps,
            strength=request.hires_strength, init_image=(), mask=(), pad="", hires_scale=1.0,
        )  # fmt: skip

    @torch.inference_mode()
    def upscale(
        self, latents: torch.Tensor, hires: Sequence[Request], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """First-pass latents -> the hires pass's init latents. "latent": bilinearly resized in latent space (A1111's
        default "Latent" upscaler, antialias off); "lanczos": decoded to 8-bit pixels, resized by PIL's Lanczos and
        encoded again, its posterior sample drawn from `generators`."""
        first, step = hires[0], self.config.vae.downsample
        if first.hires_upscale == "latent":
            size = (first.height // step, first.width // step)
            return F.interpolate(latents, size=size, mode="bilinear", antialias=False)
        images = [to_pil(p) for p in pixels(self.decode(latents))]
        return self.encode(torch.cat([image_tensor(im, first.width, first.height) for im in images]), generators)

    def generate(
        self, requests: Sequence[Request], on_step: Callable[[int, int], None] | None = None
    ) -> list[Image.Image | None]:
        """Render one image per request (all sharing Request.batch_key()); None for an image whose latents
        or pixels are not finite (an fp16 overflow), so one bad image does not sink its batch."""
        if not requests:
            return []
        latents = self.latents(requests, on_step)
        images = self.decode(latents)  # clamping keeps NaN, so both stages are checked
        finite = torch.isfinite(latents.flatten(1)).all(1).cpu() & torch.isfinite(images.flatten(1)).all(1)
        return [to_pil(p) if ok else None for p, ok in zip(pixels(images), finite.tolist(), strict=True)]


def _generators(requests: Sequence[Request]) -> list[torch.Generator]:
    """Image i's CPU generator, seeded with its seed: every random draw of its render comes from it."""
    return [torch.Generator("cpu").manual_seed(r.seed) for r in requests]


def _pass_progress(
    on_step: Callable[[int, int], None] | None, totals: Sequence[int], index: int
) -> Callable[[int, int], None] | None:
    """on_step as pass `index` of several calls it: evaluations counted over all the passes."""
    if on_step is None:
        return None
    before, total = sum(totals[:index]), sum(totals)
    return lambda done, _: on_step(before + done, total)


def _emphasis(context: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's (77, D) context: scaled per token, then rescaled so the
    chunk's mean is what it was (A1111 takes the mean over its batch; one prompt's chunk here, so an image
    renders the same alone or in a batch, as A1111 does at batch size 1)."""
    if not chunk.emphasised:
        return context
    weights = torch.tensor(chunk.weights, dtype=context.dtype, device=context.device)
    original = context.mean()
    context = context * weights[:, None]
    return context * (original / context.mean())


def _triggers(embeddings: Sequence[Embedding], first_id: int) -> list[Trigger]:
    """Each embedding's name and the ids of its vectors: first_id on, row by row of _vector_table's table."""
    triggers, next_id = [], first_id
    for embedding in embeddings:
        triggers.append(Trigger(embedding.name, tuple(range(next_id, next_id + embedding.count))))
        next_id += embedding.count
    return triggers


def _vector_table(embeddings: Sequence[Embedding], encoder: int) -> torch.Tensor | None:
    """The embeddings' vectors for one text encoder, stacked (E, width) in order; None without embeddings."""
    return torch.cat([e.vectors[encoder] for e in embeddings]) if embeddings else None


def _extra_vectors(tables: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """Per-row tables as one (B, E, width) batch, zero-padded to the longest; None when no row has one."""
    present = [t for t in tables if t is not None]
    if not present:
        return None
    empty = present[0].new_zeros(0, present[0].shape[1])
    rows = [empty if t is None else t for t in tables]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device)
