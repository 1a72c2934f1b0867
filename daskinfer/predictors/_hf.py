"""Hugging Face text predictors: embeddings, classification, generation.

They share one loop (``_HFTextPredictor.__call__``): tokenize the batch's texts without
padding, cut the batch into sub-batches (by token budget when ``max_tokens_per_batch``
is set, see ``_tokens.py``), pad each sub-batch only to its own longest row, run the
model, and put the outputs back in input order. Subclasses say how to load the model
and what one sub-batch's forward pass returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daskinfer.exceptions import PlanError
from daskinfer.predictors._common import (
    TORCH_DTYPES,
    Batch,
    batch_columns,
    check_choice,
    check_keep,
    check_positive_int,
    limit_torch_threads,
    pick_torch_device,
    require_columns,
    with_outputs,
)
from daskinfer.predictors._tokens import TokenCounters, plan_sub_batches


class _HFTextPredictor:
    """Base of the text predictors: tokenizer, device, token-aware sub-batches, counters.

    Invariant: ``__call__`` returns one output row per input row, in input order, however
    the rows were regrouped into sub-batches.
    """

    #: padding side of the tokenizer; decoder-only generation needs "left"
    padding_side = "right"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        text_column: str = "text",
        tokenizer: str | os.PathLike[str] | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int | None = None,
        keep_input_columns: bool | Sequence[str] = True,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, (str, os.PathLike)) or not str(model):
            raise PlanError(
                f"{name}(model={model!r}): give a local model directory or a from_pretrained name"
            )
        if not isinstance(text_column, str) or not text_column:
            raise PlanError(f"{name}(text_column={text_column!r}): give a column name")
        check_positive_int(name, "max_length", max_length)
        check_positive_int(name, "max_tokens_per_batch", max_tokens_per_batch)
        check_choice(name, "dtype", dtype, TORCH_DTYPES)
        self.text_column = text_column
        self.keep_input_columns = check_keep(name, keep_input_columns)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.counters = TokenCounters()

        import torch
        from transformers import AutoTokenizer

        self.device = torch.device(pick_torch_device(device))
        limit_torch_threads(self.device.type, num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or model))
        self.tokenizer.padding_side = self.padding_side
        if self.tokenizer.pad_token is None:  # GPT-2's tokenizer has none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = self.tokenizer.model_max_length
        self.max_length = max_length or (
            limit if isinstance(limit, int) and limit < 100_000 else 512
        )
        if max_tokens_per_batch is not None and max_tokens_per_batch < self.max_length:
            raise PlanError(
                f"{name}(max_tokens_per_batch={max_tokens_per_batch}): the budget must hold "
                f"at least one row of max_length={self.max_length} tokens; raise it or "
                "lower max_length"
            )
        self.dtype = getattr(torch, dtype) if dtype not in (None, "float32") else None
        self.model = self._load_model(str(model)).to(self.device).eval()

    # ------------------------------------------------------------------ subclass API
    def _load_model(self, model: str) -> Any:
        """The model, on the CPU; the base class moves it to the device."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _forward(self, input_ids: Any, attention_mask: Any) -> dict[str, np.ndarray]:
        """Outputs of one padded sub-batch, one row per input row, as numpy."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        """The output columns of a batch of no rows."""
        raise NotImplementedError  # pragma: no cover - abstract

    # ------------------------------------------------------------------ the loop
    def __call__(self, batch: Any) -> Batch:
        """Tokenize, run by sub-batches, restore input order, add the output columns."""
        columns = batch_columns(batch)
        require_columns(type(self).__name__, columns, [self.text_column])
        texts = [str(t) for t in columns[self.text_column]]
        if not texts:  # an empty block still gets the output columns, typed
            return with_outputs(columns, self._empty_outputs(), self.keep_input_columns)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        sub_batches = plan_sub_batches(lengths, self.max_tokens_per_batch)
        self.counters.add(lengths, sub_batches)
        parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        for rows in sub_batches:
            ids, mask = self._pad([encoded[i] for i in rows])
            parts.append((rows, self._run(ids, mask)))
        return with_outputs(columns, _restore_order(parts, len(texts)), self.keep_input_columns)

    def _pad(self, rows: list[list[int]]) -> tuple[Any, Any]:
        """Pad rows to their own longest length; move to the device."""
        padded = self.tokenizer.pad({"input_ids": rows}, padding="longest", return_tensors="pt")
        ids, mask = padded["input_ids"], padded["attention_mask"]
        if self.device.type == "cuda":  # pinned: the copy overlaps the host's work
            return (
                ids.pin_memory().to(self.device, non_blocking=True),
                mask.pin_memory().to(self.device, non_blocking=True),
            )
        return ids, mask

    def _run(self, ids: Any, mask: Any) -> dict[str, np.ndarray]:
        import torch

        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return self._forward(ids, mask)

    def daskinfer_metrics(self) -> dict[str, float]:
        """Token counters since the previous call (then reset): real, padded, padded in order.

        ``tokens_padded / tokens_real`` is the padding waste of what ran;
        ``tokens_padded_in_order / tokens_real`` is the waste that fixed sub-batches of the
        same row counts in input order would have had (the "before").
        """
        return self.counters.take()


def _restore_order(
    parts: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]], n: int
) -> dict[str, np.ndarray]:
    """Scatter each sub-batch's outputs back to the rows they came from."""
    if not parts:
        return {}
    out: dict[str, np.ndarray] = {}
    for rows, values in parts:
        for key, value in values.items():
            if key not in out:
                out[key] = np.empty((n, *value.shape[1:]), dtype=value.dtype)
            out[key][rows] = value
    return out


class HFEmbeddingPredictor(_HFTextPredictor):
    """Sentence embeddings: a transformer encoder, mean pooling, optional L2 normalisation.

    The pooling is sentence-transformers': the mean of the last hidden states over the
    real (unmasked) tokens. ``all-MiniLM-L6-v2`` with ``normalize=True`` gives the same
    vectors as ``SentenceTransformer(...).encode`` (to 1e-4 in float32).

    Parameters
    ----------
    model
        A local model directory or a ``from_pretrained`` name (loaded with ``AutoModel``).
    text_column, output_column
        The input text column and the output column: one float32 vector per row.
    normalize
        L2-normalise each vector (for cosine similarity by dot product).
    tokenizer
        Where to load the tokenizer from; default: ``model``.
    max_length
        Truncate texts to this many tokens; default: the tokenizer's ``model_max_length``
        (else 512). Note sentence-transformers may set a shorter ``max_seq_length``
        (256 for all-MiniLM-L6-v2); pass it here to match on long texts.
    max_tokens_per_batch
        Token budget per forward pass (rows x longest row); rows are sorted by length
        within each batch and regrouped (see ``docs/models.md``). ``None``: one pass per
        batch, padded to the batch's longest row.
    keep_input_columns, device, dtype, num_threads
        As for ``TorchPredictor``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        text_column: str = "text",
        output_column: str = "embedding",
        normalize: bool = False,
        tokenizer: str | os.PathLike[str] | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int | None = None,
        keep_input_columns: bool | Sequence[str] = True,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.output_column = output_column
        self.normalize = normalize
        super().__init__(
            model,
            text_column=text_column,
            tokenizer=tokenizer,
            max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch,
            keep_input_columns=keep_input_columns,
            device=device,
            dtype=dtype,
            num_threads=num_threads,
        )

    def _load_model(self, model: str) -> Any:
        from transformers import AutoModel

        return AutoModel.from_pretrained(model)

    def _forward(self, input_ids: Any, attention_mask: Any) -> dict[str, np.ndarray]:
        import torch

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {self.output_column: pooled.cpu().numpy()}

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        return {self.output_column: np.empty((0, self.model.config.hidden_size), np.float32)}


class HFTextClassificationPredictor(_HFTextPredictor):
    """Text classification: logits -> label id, label name (``config.id2label``), score.

    Parameters
    ----------
    model
        A local directory or ``from_pretrained`` name of a sequence-classification model
        (``AutoModelForSequenceClassification``).
    label_column, label_id_column, score_column
        Output columns: the label name (str), its id (int64) and its softmax probability
        (float32).
    text_column, tokenizer, max_length, max_tokens_per_batch, keep_input_columns,
    device, dtype, num_threads
        As for ``HFEmbeddingPredictor``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        text_column: str = "text",
        label_column: str = "label",
        label_id_column: str = "label_id",
        score_column: str = "score",
        tokenizer: str | os.PathLike[str] | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int | None = None,
        keep_input_columns: bool | Sequence[str] = True,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.label_column = label_column
        self.label_id_column = label_id_column
        self.score_column = score_column
        super().__init__(
            model,
            text_column=text_column,
            tokenizer=tokenizer,
            max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch,
            keep_input_columns=keep_input_columns,
            device=device,
            dtype=dtype,
            num_threads=num_threads,
        )
        id2label = getattr(self.model.config, "id2label", None) or {}
        self.labels = np.array(
            [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.model.config.num_labels)],
            dtype=object,
        )

    def _load_model(self, model: str) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(model)

    def _forward(self, input_ids: Any, attention_mask: Any) -> dict[str, np.ndarray]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        probs = logits.softmax(dim=-1)
        score, label_id = probs.max(dim=-1)
        ids = label_id.cpu().numpy().astype(np.int64)
        return {
            self.label_column: self.labels[ids],
            self.label_id_column: ids,
            self.score_column: score.cpu().numpy().astype(np.float32),
        }

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        return {
            self.label_column: np.empty(0, dtype=object),
            self.label_id_column: np.empty(0, dtype=np.int64),
            self.score_column: np.empty(0, dtype=np.float32),
        }


class HFGenerationPredictor(_HFTextPredictor):
    """Text generation with a causal language model; greedy by default, left padding.

    Parameters
    ----------
    model
        A local directory or ``from_pretrained`` name (``AutoModelForCausalLM``).
    output_column
        The generated continuation (the prompt is not repeated), special tokens removed.
    max_new_tokens
        Tokens generated per row.
    generate_kwargs
        Extra arguments for ``model.generate`` (``do_sample=True``, ``temperature``,
        ``num_beams``...); the default is greedy decoding, deterministic.
    text_column, tokenizer, max_length, max_tokens_per_batch, keep_input_columns,
    device, dtype, num_threads
        As for ``HFEmbeddingPredictor``. The token budget counts prompt tokens only.
    """

    padding_side = "left"  # generation continues after the last real token of each row

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        text_column: str = "text",
        output_column: str = "generated_text",
        max_new_tokens: int = 32,
        generate_kwargs: Mapping[str, Any] | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int | None = None,
        keep_input_columns: bool | Sequence[str] = True,
        device: str | None = None,
        dtype: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        check_positive_int(type(self).__name__, "max_new_tokens", max_new_tokens, allow_none=False)
        self.output_column = output_column
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.generate_kwargs["max_new_tokens"] = max_new_tokens
        super().__init__(
            model,
            text_column=text_column,
            tokenizer=tokenizer,
            max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch,
            keep_input_columns=keep_input_columns,
            device=device,
            dtype=dtype,
            num_threads=num_threads,
        )
        self.generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)

    def _load_model(self, model: str) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model)

    def _forward(self, input_ids: Any, attention_mask: Any) -> dict[str, np.ndarray]:
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **self.generate_kwargs
        )
        new_tokens = out[:, input_ids.shape[1] :].cpu()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return {self.output_column: np.array(texts, dtype=object)}

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        return {self.output_column: np.empty(0, dtype=object)}
