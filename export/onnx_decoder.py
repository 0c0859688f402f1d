"""Qwen2.5-VL text decoder with an explicit KV cache -> ONNX (`decoder.onnx` + `embed_tokens.npy`).

Graph IO (see `finers_rt.specs.decoder_spec`):
    inputs_embeds  float32 [B, S, H]      token embeddings, image features already merged (host)
    position_ids   int64   [3, B, S]      M-RoPE (t, h, w) positions (`finers_rt.qwen_rope`)
    attention_mask int64   [B, P+S]       1 = real token, 0 = padding, over past + new tokens
    past_key_i / past_value_i   float32 [B, KV, P, D]   per layer i (post-RoPE keys, as HF caches them)
 -> logits         float32 [B, V]         for the LAST position only
    present_key_i / present_value_i float32 [B, KV, P+S, D]

The token embedding table is saved beside the graph as `embed_tokens.npy` (float32 [V, H]): the
runtime looks tokens up on the host, where image features are merged too.
Offline step only (needs the `[export]` extra); `export_decoder` verifies the graph against HF's
text model in ONNX Runtime before it returns.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import IMAGE_PAD_ID
from ..qwen_rope import decode_position_ids, rope_index
from ..specs import decoder_spec

log = logging.getLogger(__name__)

# Example sizes traced by the exporter: all > 1 (torch.export specialises 0/1-sized dims) and all
# different from each other and from the model's static dims, so no two dims get unified.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 3, 7, 5
VERIFY_PREFILL_GRID = (1, 28, 36)  # 14 x 18 = 252 merged image tokens, real 3-D positions
VERIFY_TEXT = (20, 26)  # text tokens before / after the image block: prefill S = 20 + 254 + 26 = 300
VERIFY_DECODE_STEPS = 5
VISION_START_ID, VISION_END_ID = 151652, 151653  # <|vision_start|>, <|vision_end|>
PROTOBUF_LIMIT = 2**31 - 1  # bytes: above this the weights must go to an external data file


class DecoderForExport(nn.Module):
    """Export-only wrapper around HF's Qwen2.5-VL text model + lm_head. Not for direct use.

    Runs HF's own modules (RMSNorms, q/k/v/o projections, MLPs, M-RoPE `rotary_emb` with the
    config's mrope_section, `apply_rotary_pos_emb`) with the KV cache as plain tensors, so the
    trace has no Cache object and no data-dependent control flow. Attention is written out:
    grouped-query heads are broadcast ([B, KV, G, S, D]) instead of repeating the cache G times.
    """

    def __init__(self, model):
        super().__init__()
        text = model.model.language_model
        self.layers = text.layers
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.lm_head
        cfg = text.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @staticmethod
    def _mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[B, 1, 1, S, P+S] float32 additive bias: 0 where causal over absolute cache positions
        AND not padding, finfo.min elsewhere.

        Built once per forward and added per layer: ORT's broadcasting Where (masked_fill) on the
        [B, KV, G, S, P+S] scores took ~2/3 of a 2,900-token prefill; Cast + Mul once and an Add per
        layer do the same. finfo.min, not -inf: a fully padded query row then gives finite
        (ignored) output, not NaN; min + a finite score rounds back to min in float32.
        """
        total = attention_mask.shape[1]
        query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)  # [S], in P..P+S-1
        key_pos = torch.arange(total, device=attention_mask.device)  # [P+S]
        causal = key_pos[None, :] <= query_pos[:, None]  # [S, P+S]
        allowed = causal[None] & attention_mask.bool()[:, None, :]  # [B, S, P+S]
        return (~allowed[:, None, None]).to(torch.float32) * torch.finfo(torch.float32).min

    def _attention(self, layer, x, cos, sin, mask, past_k, past_v):
        """x [B, S, H] -> (attn out [B, S, H], present k, v [B, KV, P+S, D])."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            apply_rotary_pos_emb,
        )

        attn = layer.self_attn
        batch, seq, _ = x.shape
        d, kv, groups = self.head_dim, self.kv_heads, self.heads // self.kv_heads
        q = attn.q_proj(x).reshape(batch, seq, self.heads, d).transpose(1, 2)  # [B, Hq, S, D]
        k = attn.k_proj(x).reshape(batch, seq, kv, d).transpose(1, 2)  # [B, KV, S, D]
        v = attn.v_proj(x).reshape(batch, seq, kv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # HF's M-RoPE rotation (cos/sin [B, S, D])
        k = torch.cat([past_k, k], dim=2)  # [B, KV, P+S, D]
        v = torch.cat([past_v, v], dim=2)
        # Query head h uses KV head h // groups (HF repeat_kv order): view q as [B, KV, G, S, D].
        qg = q.reshape(batch, kv, groups, seq, d)
        scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * attn.scaling  # [B, KV, G, S, P+S]
        scores = scores + mask  # additive bias from _mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.unsqueeze(2))  # [B, KV, G, S, D]
        out = out.reshape(batch, self.heads, seq, d).transpose(1, 2).reshape(batch, seq, self.heads * d)
        return attn.o_proj(out), k, v

    def forward(self, inputs_embeds, position_ids, attention_mask, past: list[torch.Tensor]):
        """past: [k_0, v_0, k_1, v_1, ...]. Returns (logits [B, V], k_0', v_0', k_1', ...)."""
        hidden = inputs_embeds
        cos, sin = self.rotary_emb(hidden, position_ids)  # [B, S, D] each, mrope sections merged
        mask = self._mask(attention_mask, hidden.shape[1])
        presents = []
        for i, layer in enumerate(self.layers):
            attn_out, k, v = self._attention(
                layer, layer.input_layernorm(hidden), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [k, v]
        logits = self.lm_head(self.norm(hidden[:, -1]))  # [B, V]: only the last position is sampled
        return (logits, *presents)


def load_model(checkpoint: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def spec_for(model):
    """The decoder GraphSpec of this model's text config."""
    cfg = model.model.language_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return decoder_spec(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.hidden_size, cfg.vocab_size)


def _example_inputs(spec, hidden: int) -> tuple:
    """(inputs_embeds, position_ids, attention_mask, past list) at the EXAMPLE_* sizes."""
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    past = [torch.randn(b, t.shape[1], p, t.shape[3]) for t in spec.inputs[3:]]
    positions = torch.arange(p, p + s).expand(3, b, s).contiguous()
    return torch.randn(b, s, hidden) * 0.02, positions, torch.ones(b, p + s, dtype=torch.int64), past


def _dynamic_shapes(spec) -> tuple:
    """Spec dim names per input, in forward's argument order (strings => named dynamic dims)."""
    def dyn(t):
        return {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}

    embeds, positions, mask, *past = spec.inputs
    return dyn(embeds), dyn(positions), dyn(mask), [dyn(t) for t in past]


def _export(wrapper: DecoderForExport, spec, out_path: Path, opset: int) -> str:
    """torch.onnx.export with the dynamo exporter; returns the exporter's name."""
    hidden = spec.inputs[0].shape[2]
    n_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        # Every input repeats the dim names "batch"/"seq"; the exporter warns once per repeat.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape")
        torch.onnx.export(
            wrapper,
            _example_inputs(spec, hidden),
            str(out_path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec),
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=n_bytes > PROTOBUF_LIMIT * 0.9,  # one file unless protobuf cannot hold it
        )
    return "dynamo"


def _finish_io(out_path: Path, spec) -> None:
    """Check the graph's IO names against the spec; name the presents' length dim "total".

    The exporter names it "seq + past" (its symbolic expression); the spec calls it "total", like
    the attention mask's. Only the graph proto is rewritten: external weights stay where they are.
    """
    import onnx

    model = onnx.load(str(out_path), load_external_data=False)
    graph = model.graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != (spec.input_names, spec.output_names):
        raise RuntimeError(f"{out_path}: graph IO {names} differs from the decoder spec")
    for value in graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param.replace(" ", "") in ("seq+past", "past+seq"):
                dim.dim_param = "total"
    onnx.save(model, str(out_path))


# ---------------------------------------------------------------- verification (torch vs ORT)


def _verify_prompt(hidden: int, table: torch.Tensor, seed: int = 0):
    """(inputs_embeds [1, S, H], position_ids [3, 1, S] int64, rope_delta) for a ~300-token prompt.

    Token embeddings are random (N(0, std of the table)), positions are real M-RoPE ids of a
    text + image + text prompt, so the image block's 3-D positions are exercised.
    """
    t, h, w = VERIFY_PREFILL_GRID
    n_image = t * h * w // 4
    before, after = VERIFY_TEXT
    image = np.concatenate([[VISION_START_ID], np.full(n_image, IMAGE_PAD_ID), [VISION_END_ID]])
    ids = np.concatenate([np.zeros(before, np.int64), image, np.zeros(after, np.int64)])
    positions, delta = rope_index(ids, np.asarray([VERIFY_PREFILL_GRID]))
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, len(ids), hidden, generator=gen) * float(table.std())
    return embeds, positions, delta


def _torch_steps(model, embeds, positions, delta, steps: int):
    """HF text model + DynamicCache: logits [1, V] for prefill and each greedy decode step.

    Returns (list of logits, list of (inputs_embeds, position_ids) fed at each step).
    """
    from transformers import DynamicCache

    text, lm_head = model.model.language_model, model.lm_head
    table = text.embed_tokens.weight
    cache = DynamicCache(config=text.config)
    feeds, logits = [], []
    x, pos, seq = embeds, torch.from_numpy(positions), embeds.shape[1]
    with torch.no_grad():
        for step in range(steps + 1):
            total = seq + step
            out = text(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones(1, total, dtype=torch.int64),
                       past_key_values=cache, use_cache=True)
            feeds.append((x.numpy(), pos.numpy()))
            logits.append(lm_head(out.last_hidden_state[:, -1]).numpy())
            token = int(logits[-1].argmax())
            x = table[token].reshape(1, 1, -1)
            pos = torch.from_numpy(decode_position_ids(total, delta))
    return logits, feeds


def _ort_steps(out_path: Path, spec, feeds) -> list[np.ndarray]:
    """Run the graph in ONNX Runtime (CPU) on the same per-step inputs; presents feed the next step."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    past = {t.name: np.zeros((1, t.shape[1], 0, t.shape[3]), np.float32) for t in spec.inputs[3:]}
    logits, total = [], 0
    for embeds, positions in feeds:
        total += embeds.shape[1]
        outs = session.run(None, {"inputs_embeds": embeds, "position_ids": positions,
                                  "attention_mask": np.ones((1, total), np.int64), **past})
        logits.append(outs[0])
        past = {name.replace("present", "past"): v for name, v in zip(spec.output_names[1:], outs[1:])}
    return logits


def compare(reference: list[np.ndarray], actual: list[np.ndarray], atol: float) -> dict:
    """Max abs diff, % of logits over atol, argmax agreement over all steps and in how many."""
    diffs = [np.abs(r - a) for r, a in zip(reference, actual)]
    max_diff = float(max(d.max() for d in diffs))
    mismatch = 100.0 * sum(int((d > atol).sum()) for d in diffs) / sum(d.size for d in diffs)
    agree = sum(int(r.argmax()) == int(a.argmax()) for r, a in zip(reference, actual))
    return {"max_abs_diff": max_diff, "mismatch_pct": mismatch, "argmax_equal": agree == len(diffs),
            "argmax_steps_equal": f"{agree}/{len(diffs)}"}


def verify_decoder(model, out_path: Path, spec, *, steps: int = VERIFY_DECODE_STEPS, ort_steps=_ort_steps) -> dict:
    """Prefill (S = 300) + `steps` greedy decode steps: HF text model vs the ONNX graph in ORT.

    ort_steps(out_path, spec, feeds) -> logits per step: how this graph kind is run in ORT.
    """
    table = model.model.language_model.embed_tokens.weight.detach()
    embeds, positions, delta = _verify_prompt(table.shape[1], table)
    reference, feeds = _torch_steps(model, embeds, positions, delta, steps)
    report = compare(reference, ort_steps(out_path, spec, feeds), spec.atol)
    report.update(prefill_len=int(embeds.shape[1]), decode_steps=steps, atol=spec.atol)
    return report


def save_embed_table(model, out_dir: Path) -> None:
    """`embed_tokens.npy` (float32 [V, H]) beside the graph: the runtime looks tokens up on the host."""
    table = model.model.language_model.embed_tokens.weight.detach().to(torch.float32).numpy()
    np.save(Path(out_dir) / "embed_tokens.npy", table)


def check_report(out_path: Path, spec, report: dict) -> dict:
    """Log an export's verification report; raise RuntimeError when its logits are over the spec's atol."""
    log.info("decoder %s (%s exporter): max abs diff %.3g, mismatch %.4f%% (atol %g), argmax equal in %s steps",
             out_path, report["exporter"], report["max_abs_diff"], report["mismatch_pct"], spec.atol,
             report["argmax_steps_equal"])
    if not report["max_abs_diff"] <= spec.atol:  # NaN (an fp16 overflow) fails too
        raise RuntimeError(f"{out_path}: logits differ from torch by {report['max_abs_diff']:.3g} > atol "
                           f"{spec.atol} ({spec.tolerance_reason}); report {report}")
    return report


def export_decoder(checkpoint: Path, out_path: Path, *, opset: int = 18) -> dict:
    """Export `checkpoint`'s text decoder to `out_path` (+ embed_tokens.npy beside it), verified.

    Returns the verification report (max_abs_diff, mismatch_pct, argmax_equal, exporter, ...);
    raises RuntimeError when the graph's logits differ from HF's by more than the spec's atol.
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(checkpoint)
    spec = spec_for(model)
    save_embed_table(model, out_path.parent)
    t0 = time.perf_counter()
    exporter = _export(DecoderForExport(model).eval(), spec, out_path, opset)
    export_s = time.perf_counter() - t0
    _finish_io(out_path, spec)
    report = verify_decoder(model, out_path, spec)
    report.update(exporter=exporter, opset=opset, export_s=round(export_s, 1))
    return check_report(out_path, spec, report)
