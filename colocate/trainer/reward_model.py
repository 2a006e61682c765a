"""A reward model: a frozen causal LM with a scalar head on the last token, part of its layers streamed if asked."""

from __future__ import annotations

import torch
from torch import nn

from colocate.memory.layer_stream import LayerStreamer, place_streamed
from colocate.model import CausalLM, DenseCausalAttention, load_model
from colocate.model.checkpoint import checkpoint_files, read_safetensors
from colocate.model.presets import PRESETS
from colocate.rl import RolloutBatch
from colocate.trainer.offload import TrainerOffload

SCORE_NAME = "score.weight"  # the head of an HF *ForSequenceClassification checkpoint, [1, hidden]


class RewardModel(nn.Module):
    """Scores whole sequences: reward = score(hidden state of the last real token).

    >>> rm = RewardModel("/ckpt/rm", device=torch.device("cuda"), dtype=torch.bfloat16, max_positions=2048)
    >>> rewards = rm.score(batch, autocast)     # [B] float32, one per prompt + response
    A checkpoint folder is an HF sequence-classification model with one label (`score.weight` beside
    the decoder's tensors); a preset gets a random head from `seed`. Frozen: its state is its weights,
    which `offload` moves between phases like the reference's, and `offload_fraction` of its layers can
    live in pinned host memory and stream to the device for each forward (`memory.layer_stream`).
    """

    def __init__(self, model: str, *, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0,
                 offload_fraction: float = 0.0, offload_dir: str | None = None) -> None:
        super().__init__()
        self.streamer: LayerStreamer | None = None
        # An HF sequence-classification checkpoint has the decoder and `score.weight`, and no LM head (which a
        # reward model never uses: an untied one is not even allocated).
        self.lm: CausalLM = load_model(model, device=device, dtype=dtype, max_positions=max_positions, seed=seed + 2,
                                       materialize=lambda m: self._place(m, device, offload_fraction),
                                       skip_tensors=(SCORE_NAME, "lm_head.weight"))[0]
        self.score_head = nn.Linear(self.lm.config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        self._load_head(model, seed)
        self.requires_grad_(False)
        streamed = [] if self.streamer is None else self.streamer.parameters()
        self.offload = TrainerOffload(self, None, device=device, disk_dir=offload_dir, exclude=streamed)

    def _place(self, meta_model: CausalLM, device: torch.device, fraction: float) -> None:
        if not meta_model.config.tie_word_embeddings:
            meta_model.lm_head = nn.Identity()  # no vocabulary-sized matrix for a head that scores with its own
        self.streamer = place_streamed(meta_model, meta_model.model, device, fraction)

    @torch.no_grad()
    def _load_head(self, model: str, seed: int) -> None:
        if model in PRESETS:
            gen = torch.Generator(device="cpu").manual_seed(seed + 2)
            weight = torch.randn(self.score_head.weight.shape, generator=gen) * self.lm.config.hidden_size ** -0.5
            self.score_head.weight.copy_(weight)
            return
        for file in checkpoint_files(model):
            tensors = read_safetensors(file)
            if SCORE_NAME in tensors:
                head = tensors[SCORE_NAME]
                if tuple(head.shape) != tuple(self.score_head.weight.shape):
                    raise ValueError(f"{model!r}: {SCORE_NAME} has shape {tuple(head.shape)}; a reward model has one "
                                     f"label: {tuple(self.score_head.weight.shape)}")
                self.score_head.weight.copy_(head)
                return
        raise ValueError(f"{model!r} has no {SCORE_NAME}: not a sequence-classification (reward) checkpoint")

    @torch.no_grad()
    def score(self, batch: RolloutBatch, autocast) -> torch.Tensor:
        """One reward per sequence [B], float32: the head on the hidden state of its last real token."""
        b, t = batch.input_ids.shape
        attn = DenseCausalAttention(batch_size=b, seq_len=t, attention_mask=batch.attention_mask)
        with autocast():
            hidden = self.lm(batch.input_ids.flatten(), batch.positions.flatten(), attn).view(b, t, -1)
            last = batch.attention_mask.sum(1) - 1  # sequences are left-aligned: the last real position
            return self.score_head(hidden[torch.arange(b, device=hidden.device), last]).squeeze(-1).float()

