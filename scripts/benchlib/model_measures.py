"""Engine and model measures: load peak, decode throughput and its floor, updates, sleep/wake, teacher-forced
logprobs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from benchlib.device import free_device
from benchlib.measure import first_and_steady_by_key, timed
from colocate import Engine, SamplingParams
from colocate.model import CausalLM, ModelConfig
from colocate.model.attention import DenseCausalAttention

T = TypeVar("T")


def measure_load(load: Callable[[], T], device: torch.device) -> tuple[T, dict[str, Any]]:
    """`load()`, its seconds, and the device's peak allocation over it less what was allocated before
    (None off CUDA)."""
    free_device(device)
    is_cuda = device.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if is_cuda else 0
    seconds, result = timed(load, device)
    return result, {"load_s": seconds,
                    "peak_bytes": torch.cuda.max_memory_allocated(device) - before if is_cuda else None}


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def decode_step_bytes(config: ModelConfig, *, weights_bytes: int, dtype: torch.dtype, batch: int,
                      mean_context: float) -> float:
    """Bytes a decode step must read: the weights (of an untied embedding only the B rows looked up; the LM head
    whole) and the batch's KV cache at `mean_context` tokens. `weights_bytes`: the engine's, the table counted once."""
    embed_row = config.hidden_size * dtype.itemsize
    unread = 0 if config.tie_word_embeddings else (config.vocab_size - batch) * embed_row
    return weights_bytes - unread + kv_bytes_per_token(config, dtype) * batch * mean_context


def decode_throughput(engine: Engine, batch: int, *, prompt_len: int, new_tokens: int, seed: int) -> dict[str, float]:
    """Greedy, EOS ignored: one warm-up call of `new_tokens`, then one timed, then one of a single token (the prefill
    alone); tokens/s = batch * new_tokens / t(N); a decode step = (t(N) - t(1)) / (N - 1)."""
    device = engine.config.torch_device
    prompts = torch.randint(0, engine.model_config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(seed + batch)).tolist()
    full, one = (SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in (new_tokens, 1))
    engine.generate(prompts, full)
    total_s, outs = timed(lambda: engine.generate(prompts, full), device)
    prefill_s, _ = timed(lambda: engine.generate(prompts, one), device)
    assert all(len(o.token_ids) == new_tokens for o in outs), "a sequence stopped early"
    return {"total_s": total_s, "prefill_s": prefill_s, "tokens_per_s": batch * new_tokens / total_s,
            "step_s": max(total_s - prefill_s, 0.0) / (new_tokens - 1)}


def timed_updates(engine: Engine, named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], *,
                  repeats: int) -> list[dict[str, Any]]:
    """`engine.update_weights(named_tensors())` `repeats` times: seconds, and on CUDA the peak extra allocation."""
    device, runs = engine.config.torch_device, []
    is_cuda = device.type == "cuda"
    for _ in range(repeats):
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if is_cuda else 0
        seconds, _ = timed(lambda: engine.update_weights(named_tensors()), device)
        runs.append({"s": seconds, "peak_extra_bytes": torch.cuda.max_memory_allocated(device) - before
                     if is_cuda else None})
    return runs


def weights_sleep_wake(engine: Engine, *, repeats: int) -> dict[str, Any]:
    """Release ("weights", "cuda_graph") to cpu and resume the weights, `repeats` times; the graphs stay released
    until after the last cycle, then are captured once (timed apart: not a cost of the weights)."""
    device, runs = engine.config.torch_device, []
    for _ in range(repeats):
        release_s, report = timed(lambda: engine.release_memory(("weights", "cuda_graph"), weights_to="cpu"), device)
        resume_s, _ = timed(lambda: engine.resume_memory(("weights",)), device)
        runs.append({"release_s": release_s, "resume_s": resume_s, "host_bytes": report.tags["weights"].host_bytes})
    graph_s, _ = timed(lambda: engine.resume_memory(("cuda_graph",)), device)
    return {"runs": runs, **first_and_steady_by_key(runs, ("release_s", "resume_s")), "graph_capture_s": graph_s}


@torch.inference_mode()
def teacher_forced_logprobs(model: CausalLM, ids: torch.Tensor, start: int) -> torch.Tensor:
    """ids [B, L] -> [B, L - start, V] float32 log-softmax at the positions that predict tokens start..L-1."""
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device).repeat(batch)
    hidden = model(ids.flatten(), positions, DenseCausalAttention(batch_size=batch, seq_len=length))
    hidden = hidden.reshape(batch, length, -1)[:, start - 1:length - 1]
    logits = model.compute_logits(hidden.reshape(-1, hidden.shape[-1]))
    return logits.float().log_softmax(-1).view(batch, length - start, -1)


def logprob_gap(reference: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor) -> dict[str, float | int]:
    """[B, N, V] log-softmax of two models at the same positions, tokens [B, N] the ones there: mean KL(reference ||
    other) per position, |delta logprob| of the tokens (max and mean), and top-1 agreement."""
    delta = (reference.gather(-1, tokens[..., None]) - other.gather(-1, tokens[..., None])).abs()
    return {"mean_kl": (reference.exp() * (reference - other)).sum(-1).mean().item(),
            "max_abs_dlogprob": delta.max().item(), "mean_abs_dlogprob": delta.mean().item(),
            "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item(),
            "num_tokens": tokens.numel()}
