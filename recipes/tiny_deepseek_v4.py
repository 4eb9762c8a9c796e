"""Write a tiny random DeepSeek-V4 checkpoint (transformers' ``DeepseekV4ForCausalLM``) with the demo tokenizer.

For trying DeepSeek-V4 in tx offline: LoRA alone (the checkpoint's hyper-connections frozen) against LoRA + the
native mHC trained, on the demo's chat tasks:

    python recipes/tiny_deepseek_v4.py --out runs/tiny-v4
    python recipes/compare_connectors.py --model runs/tiny-v4 --configs lora,native --small --out runs/v4-compare
    tx demo --model runs/tiny-v4 --steps 100          # LoRA + the native mHC trained (hc_mult streams)

The blocks mix the three attention kinds (HCA, sliding window, CSA with the Lightning indexer choosing
``--index-topk`` entries) and both MoE kinds (hash routing on the first layers, sqrt-softplus top-k after), with
``hc_mult`` streams. Weights are transformers' initialisation (normal, std ``initializer_range``) with the hash
table ``tid2eid`` and the hyper-connections' ``base`` drawn at random (transformers leaves them zero: real values
come from a pretrained checkpoint). Needs torch and transformers (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tx.demo import DEMO_MODEL

ATTENTION = {"H": "heavily_compressed_attention", "S": "sliding_attention", "C": "compressed_sparse_attention"}


def build(
    out: Path,
    *,
    layers: str,
    hidden: int,
    hc_mult: int,
    experts: int,
    top_k: int,
    hash_layers: int,
    index_topk: int,
    seed: int,
) -> Path:
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    base = json.loads((DEMO_MODEL / "config.json").read_text())  # the tokenizer's ids
    kinds = [ATTENTION[c] for c in layers]
    if hash_layers > len(kinds):
        raise SystemExit(f"--hash-layers {hash_layers} exceeds the {len(kinds)} layers of --layers {layers!r}")
    heads = max(hidden // 32, 2)
    cfg = DeepseekV4Config(
        vocab_size=base["vocab_size"],
        hidden_size=hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=len(kinds),
        layer_types=kinds,
        mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (len(kinds) - hash_layers),
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=32,
        q_lora_rank=hidden // 2,
        o_lora_rank=hidden // 2,
        o_groups=2 if heads % 2 == 0 else 1,
        partial_rotary_factor=0.5,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        hc_mult=hc_mult,
        sliding_window=16,
        compress_rates={ATTENTION["C"]: 4, ATTENTION["H"]: 16},
        index_n_heads=2,
        index_head_dim=16,
        index_topk=index_topk,
        max_position_embeddings=512,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):  # top_k distinct experts per token id
                buf.copy_(torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(buf.shape[0])]))
        for name, p in model.named_parameters():
            if name.endswith("base"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, out / name)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tiny-v4")
    ap.add_argument("--layers", default="HSCHCH", help="attention kind per layer: H (HCA), S (sliding), C (CSA)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--hc-mult", type=int, default=4, help="streams of the native hyper-connections")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hash-layers", type=int, default=2, help="the first layers route by token id (tid2eid)")
    ap.add_argument("--index-topk", type=int, default=4, help="compressed entries each CSA query keeps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if set(args.layers) - set(ATTENTION):
        raise SystemExit(f"--layers {args.layers!r}: use the letters H, S and C")
    folder = build(
        Path(args.out),
        layers=args.layers,
        hidden=args.hidden,
        hc_mult=args.hc_mult,
        experts=args.experts,
        top_k=args.top_k,
        hash_layers=args.hash_layers,
        index_topk=args.index_topk,
        seed=args.seed,
    )
    print(f"tiny DeepSeek-V4 written to {folder}")


if __name__ == "__main__":
    main()
