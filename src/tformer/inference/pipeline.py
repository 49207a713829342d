"""Use any trained run without knowing its family: `pipeline(run_dir)` opens it and offers the
verbs its model can do (asked through `tformer.models.protocols`, never by family name).

    p = pipeline("runs/bert-sentiment-minilm")
    p.classify(["a wonderful film", "dull and far too long"])   # [Prediction(label="1", ...), ...]
    pipeline("runs/vit-mnist").classify(["seven.png"])           # image files, or (H, W[, C]) uint8 arrays
    pipeline("runs/gpt-shakespeare-char").generate("ROMEO:")     # text continues the prompt
    pipeline("runs/nmt-en-es").translate(["In the beginning ..."])
    pipeline("runs/image-gen-digits").draw(["seven"], 8)          # (N, H, W, C) uint8 images

`predict(inputs)` picks the verb for the model; every verb refuses what it cannot take with one
line that says what it takes instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from tformer.data.images import IMAGE_SUFFIXES, read_image
from tformer.data.labelled import encode_texts, pad_rows, special_ids
from tformer.inference.generate import Sampling, stream, text_sampling
from tformer.inference.images import sample_images
from tformer.inference.memory import stream_with_memory
from tformer.inference.translate import translate
from tformer.models.protocols import (CausalLM, ConditionalDecoder, ImageClassifier, ImageSampler, MemoryLM,
                                      TextClassifier)
from tformer.runs.run import Run, open_run
from tformer.tokenizers.base import decode_stream

log = logging.getLogger(__name__)

VERBS = ("classify", "generate", "translate", "draw")
# fp32: the weights as trained. bf16: weights cast once; on a CPU with AMX, batch classification
# ran 2.7x faster and decoding 1.25x (benchmarks/RESULTS.md), probabilities differ by ~1e-2
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Prediction:
    """A classifier's answer for one input: the most likely label and every label's probability."""

    input: str
    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "label": self.label, "probabilities": self.probabilities}


def looks_like_image(text: str) -> bool:
    return Path(text).suffix.lower() in IMAGE_SUFFIXES


class Pipeline:
    """A trained run's model behind verbs; see the module docstring."""

    def __init__(self, run: Run, *, batch_size: int = 64, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.run, self.model, self.tokenizer = run, run.model, run.tokenizer
        self.batch_size = batch_size
        self.tokens_generated = 0  # by stream / generate since the pipeline opened (energy per token)
        if precision == "bf16":  # half the weight bytes; packed bf16 linears decode faster (nn.packed)
            self.model.to(torch.bfloat16)  # type: ignore[attr-defined]

    # -- what it can do ------------------------------------------------------------------------
    @property
    def verbs(self) -> list[str]:
        can = self.run.can
        found = {"classify": can(TextClassifier) or can(ImageClassifier),
                 "generate": can(CausalLM) or can(MemoryLM), "draw": can(ImageSampler),
                 "translate": can(ConditionalDecoder) and not can(ImageSampler)}
        return [verb for verb in VERBS if found[verb]]

    def refuse(self, verb: str) -> ValueError:
        """The error for a verb this model cannot do, naming what it can."""
        if not self.verbs:
            return ValueError(f"{self.run.path} holds a model with nothing to predict (it cannot classify, "
                              f"generate, translate or draw); fine-tune it into one that can, with "
                              f"model.init_from: {self.run.path}")
        return ValueError(f"{self.run.path} holds a model that cannot {verb}; it can {', '.join(self.verbs)}")

    def predict(self, inputs: Sequence[Any], **options: Any) -> Any:
        """The model's own verb on `inputs` (texts, image paths, prompts or conditions)."""
        verbs = self.verbs
        if not verbs:
            raise self.refuse("predict")
        if verbs[0] == "generate":
            return [self.generate(str(prompt), **options) for prompt in inputs]
        return getattr(self, verbs[0])(inputs, **options)

    # -- classify --------------------------------------------------------------------------------
    def classify(self, inputs: Sequence[Any]) -> list[Prediction]:
        """Label and probabilities of each input: sentences for a text classifier; image files or
        (H, W[, C]) uint8 arrays for an image classifier."""
        if not inputs:
            raise ValueError("nothing to classify: give at least one input")
        if self.run.can(TextClassifier):
            logits = self._text_logits([self._as_text(x) for x in inputs])
        elif self.run.can(ImageClassifier):
            logits = self._image_logits([self.as_image(x) for x in inputs])
        else:
            raise self.refuse("classify")
        probabilities = torch.softmax(logits.float(), dim=-1).numpy()
        labels = self.model.labels  # type: ignore[attr-defined]
        return [Prediction(_describe(x), labels[int(p.argmax())], {n: float(v) for n, v in zip(labels, p)})
                for x, p in zip(inputs, probabilities)]

    def _as_text(self, x: Any) -> str:
        if not isinstance(x, str):
            raise ValueError(f"{self.run.path} classifies text; got a {type(x).__name__}")
        if looks_like_image(x) and Path(x).is_file():
            raise ValueError(f"{x} is an image file, but {self.run.path} classifies text; give sentences "
                             "(arguments, or --file with one sentence per line)")
        if not x.strip():
            raise ValueError("an input is empty: give a sentence to classify")
        return x

    def as_image(self, x: Any) -> np.ndarray:
        """An (H, W, C) uint8 image with the model's size and channels."""
        height, width, channels = self.model.image_shape  # type: ignore[attr-defined]
        if isinstance(x, (str, Path)):
            if not Path(x).is_file():
                raise ValueError(f"{x!r} is not an image file; {self.run.path} classifies images "
                                 f"({'/'.join(IMAGE_SUFFIXES)} files of {height}x{width} pixels)")
            x = read_image(Path(x))
        image = np.asarray(x)
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image must be (H, W) or (H, W, C) uint8, got {image.dtype} {image.shape}")
        picture = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[..., 0])
        picture = picture.convert("L" if channels == 1 else "RGB")
        if picture.size != (width, height):
            log.info("resized a %dx%d image to the model's %dx%d", *picture.size, width, height)
            picture = picture.resize((width, height), Image.BILINEAR)
        return np.asarray(picture).reshape(height, width, channels)

    @torch.no_grad()
    def _text_logits(self, texts: list[str]) -> torch.Tensor:
        specials = special_ids(self.tokenizer)
        rows = encode_texts(texts, self.tokenizer, specials, max_length=self.model.max_tokens)  # type: ignore[attr-defined]
        chunks = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = pad_rows(rows[start:start + self.batch_size], specials.pad)
            chunks.append(self.model.classify(ids, mask).float())  # type: ignore[attr-defined]
        return torch.cat(chunks)

    @torch.no_grad()
    def _image_logits(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
        dtype = next(self.model.parameters()).dtype  # type: ignore[attr-defined]
        return torch.cat([self.model.classify(pixels[i:i + self.batch_size].to(dtype)).float()  # type: ignore[attr-defined]
                          for i in range(0, len(pixels), self.batch_size)])

    # -- generate --------------------------------------------------------------------------------
    def stream(self, prompt: str, max_new_tokens: int = 200, sampling: Sampling | None = None, *,
               seed: int | None = None) -> Iterator[str]:
        """Pieces of text (whole characters) that continue `prompt`."""
        if self.tokenizer is None or not (self.run.can(CausalLM) or self.run.can(MemoryLM)):
            raise self.refuse("generate")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        sampling = sampling or text_sampling()
        if self.run.can(MemoryLM):  # segment memory instead of a KV cache
            tokens: Iterator[int] = stream_with_memory(self.model, ids, max_new_tokens, sampling,  # type: ignore[arg-type]
                                                       seed=seed)
        else:
            steps = stream(self.model, [ids], max_new_tokens, sampling, seed=seed, sliding=True)  # type: ignore[arg-type]
            tokens = (int(token[0]) for token in steps)
        yield from decode_stream(self.tokenizer, self._counted(tokens))

    def _counted(self, tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            self.tokens_generated += 1
            yield token

    def generate(self, prompt: str, max_new_tokens: int = 200, sampling: Sampling | None = None, *,
                 seed: int | None = None) -> str:
        """The prompt's continuation (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, sampling, seed=seed))

    # -- translate -------------------------------------------------------------------------------
    def translate(self, texts: Sequence[str], *, beam_width: int | None = None) -> list[str]:
        """Translations of `texts` (beam search; default width: the recipe's, else 4)."""
        if not self.run.can(ConditionalDecoder) or self.run.can(ImageSampler) or self.tokenizer is None:
            raise self.refuse("translate")
        texts = [str(t) for t in texts]
        if not texts or not all(t.strip() for t in texts):
            raise ValueError("nothing to translate: give non-empty sentences")
        width = beam_width or int(self._recipe_data().get("beam_width", 4))
        return translate(self.model, self.tokenizer, texts, beam_width=width, too_long="truncate")  # type: ignore[arg-type]

    # -- draw ------------------------------------------------------------------------------------
    def draw(self, conditions: Sequence[str] | None = None, per_condition: int = 8, *,
             guidance: float | None = None, sampling: Sampling | None = None,
             seed: int | None = None) -> np.ndarray:
        """`per_condition` images per condition (class names or prompts; default: every class),
        grouped by condition: (N, H, W, C) uint8. Sampling and guidance default to the recipe's."""
        if not self.run.can(ImageSampler):
            raise self.refuse("draw")
        sampling_default, guidance_default = self.image_defaults()
        conditions = list(conditions) if conditions else self.default_conditions()
        return sample_images(self.model, conditions, per_condition, sampling or sampling_default,  # type: ignore[arg-type]
                             guidance_scale=guidance_default if guidance is None else guidance, seed=seed,
                             tokenizer=self.tokenizer)

    def default_conditions(self) -> list[str]:
        """One condition per class: the name, or the recipe's first prompt template filled in."""
        names = self.model.condition_names()  # type: ignore[attr-defined]
        prompts = self._recipe_data().get("prompts") or ["{name}"]
        template = prompts[0] if self.model.config.condition == "text" else "{name}"  # type: ignore[attr-defined]
        return [template.format(name=name) for name in names]

    def image_defaults(self) -> tuple[Sampling, float]:
        """(sampling, guidance scale) the recipe trained for; plain sampling without one."""
        data = self._recipe_data()
        return Sampling(data.get("temperature", 1.0), data.get("top_k")), float(data.get("guidance_scale", 1.0))

    def _recipe_data(self) -> dict[str, Any]:
        return dict((self.run.recipe or {}).get("data") or {})


def _describe(x: Any) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"array{tuple(np.shape(x))}"


def pipeline(run_dir: str | Path, checkpoint: str = "best", *, precision: str = "fp32") -> Pipeline:
    """Open a run directory (checkpoints/`checkpoint`) for prediction, its weights in `precision`."""
    return Pipeline(open_run(run_dir, checkpoint), precision=precision)


__all__ = ["Pipeline", "Prediction", "pipeline"]
