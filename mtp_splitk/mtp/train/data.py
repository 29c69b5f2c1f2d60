# Copyright © 2026 mtp_splitk contributors

"""Self-generated training text: batched sampling, storage and batches.

The target continues each seed prompt (:mod:`.prompts`) with mlx-lm's
continuous-batching generator; a sequence is the chat-templated prompt
followed by the continuation (its stop token included, so the head also
learns to draft the end of a reply). Only token ids are kept: the teacher's
hidden states and logits are recomputed by one batched forward pass per
training step, which costs little next to autoregressive generation and
keeps memory flat however much text there is.
"""

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler


class Sequences:
    """Token sequences with the length of their prompt part."""

    def __init__(self, tokens: List[List[int]] = None, prompt_lens: List[int] = None):
        self.tokens = list(tokens or [])
        self.prompt_lens = list(prompt_lens or [])

    def __len__(self):
        return len(self.tokens)

    @property
    def generated(self) -> int:
        """Tokens generated (continuations only)."""
        return sum(len(t) - p for t, p in zip(self.tokens, self.prompt_lens))

    def extend(self, prompts: List[List[int]], continuations: List[List[int]]):
        for p, c in zip(prompts, continuations):
            self.tokens.append(list(p) + list(c))
            self.prompt_lens.append(len(p))

    def save(self, path: Path):
        lengths = [len(t) for t in self.tokens]
        flat = [x for t in self.tokens for x in t]
        arrays = {
            "tokens": mx.array(np.array(flat, dtype=np.int32)),
            "lengths": mx.array(np.array(lengths, dtype=np.int32)),
            "prompt_lengths": mx.array(np.array(self.prompt_lens, dtype=np.int32)),
        }
        tmp = path.with_name(path.stem + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays)
        tmp.replace(path)  # a run killed mid-write keeps the previous file

    @classmethod
    def load(cls, path: Path) -> "Sequences":
        if not path.exists():
            return cls()
        arrays = {k: np.array(v) for k, v in mx.load(str(path)).items()}
        ends = np.cumsum(arrays["lengths"])
        starts = ends - arrays["lengths"]
        flat = arrays["tokens"].tolist()
        tokens = [flat[s:e] for s, e in zip(starts, ends)]
        return cls(tokens, arrays["prompt_lengths"].tolist())


def generate(
    model,
    tokenizer,
    prompts: List[List[int]],
    max_tokens: int,
    temperature: float,
    batch_size: int,
) -> List[List[int]]:
    """Continuations of ``prompts`` (batched; greedy at temperature 0),
    each ending with its stop token when the target stopped on its own."""
    sampler = make_sampler(temp=temperature) if temperature > 0 else None
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
    finally:
        gen.close()
    return [out[uid] for uid in uids]


def generate_into(
    data: Sequences,
    model,
    tokenizer,
    prompts: List[List[int]],
    *,
    max_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    save: Callable[[Sequences], None],
    keep_going: Callable[[], bool] = lambda: True,
    progress: Optional[Callable[[Sequences], None]] = None,
):
    """Generate the prompts ``data`` does not hold yet, one ``batch_size``
    chunk at a time, saving after each so a rerun continues where this one
    stopped. Each chunk is seeded by its index, so the text does not depend
    on where earlier runs were interrupted."""
    while len(data) < len(prompts) and keep_going():
        start = len(data) - len(data) % batch_size
        if start != len(data):  # a partial chunk (fewer prompts earlier): redo it
            data.tokens, data.prompt_lens = (
                data.tokens[:start],
                data.prompt_lens[:start],
            )
        chunk = prompts[start : start + batch_size]
        mx.random.seed(seed + start // batch_size)
        data.extend(
            chunk,
            generate(model, tokenizer, chunk, max_tokens, temperature, batch_size),
        )
        save(data)
        if progress is not None:
            progress(data)


def pad(seqs: Sequence[List[int]], multiple: int = 32) -> mx.array:
    """Right-pad to a common length (a multiple of ``multiple``, so few
    distinct shapes reach the kernels); causal attention keeps the padding
    from touching real positions."""
    length = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return mx.array(out)


class Batches:
    """The training batch of any step, reproducibly (so a resumed run sees
    the same batches as an uninterrupted one).

    Each epoch is a seeded permutation; within windows of a few batches the
    sequences are sorted by length so little of a batch is padding.
    """

    def __init__(self, data: Sequences, batch_size: int, seed: int):
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.seed = seed
        self.per_epoch = len(data) // self.batch_size
        self._epoch, self._order = None, None

    def rows(self, step: int) -> np.ndarray:
        """Indices into the data of the batch of ``step``."""
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(len(self.data))
            window = 8 * self.batch_size
            lengths = np.array([len(t) for t in self.data.tokens])
            for s in range(0, len(order), window):
                part = order[s : s + window]
                order[s : s + window] = part[np.argsort(lengths[part], kind="stable")]
            batches = order[: self.per_epoch * self.batch_size].reshape(
                self.per_epoch, self.batch_size
            )
            self._order = batches[rng.permutation(self.per_epoch)]
            self._epoch = epoch
        return self._order[index]

    def __call__(self, step: int):
        """``(tokens (B, L), lengths (B,), prompt_lens (B,))`` of ``step``."""
        rows = self.rows(step)
        seqs = [self.data.tokens[i] for i in rows]
        prompt_lens = mx.array([self.data.prompt_lens[i] for i in rows])
        lengths = mx.array([len(s) for s in seqs])
        return pad(seqs), lengths, prompt_lens
