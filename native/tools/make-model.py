#!/usr/bin/env python3
# A random-weight llama GGUF with a real tokenizer, for machines without Node.js (the borrowed GPU machine):
# the same recipe as src/io/gguf-writer.ts (tokenizer copied from a vocab GGUF, normal weights, F32 ones
# as norms, output rows of byte/control/unused tokens zeroed), written with the source tree's own gguf-py.
# Not byte-identical to the TypeScript generator (another PRNG); deterministic by seed.
#
#   python3 native/tools/make-model.py --src native/build/mesh/src --out m.gguf --layers 16 --embd 2048 --ff 5632
import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", required=True, help="llama.cpp source tree (for gguf-py and models/ggml-vocab-llama-spm.gguf)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--ff", type=int, default=192)
    ap.add_argument("--heads", type=int, default=0, help="default: embd/64 (embd/16 below 128)")
    ap.add_argument("--kv-heads", type=int, default=0, help="default: heads")
    ap.add_argument("--type", choices=["f16", "f32", "q8_0"], default="f16")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--std", type=float, default=0.05)
    a = ap.parse_args()

    sys.path.insert(0, os.path.join(a.src, "gguf-py"))
    try:
        import numpy as np
        import gguf
    except ImportError as e:
        print(f"make-model.py: needs numpy and the source tree's gguf-py ({e})", file=sys.stderr)
        return 1

    heads = a.heads or (a.embd // 64 if a.embd >= 128 else a.embd // 16)
    kv_heads = a.kv_heads or heads
    head_dim = a.embd // heads
    vocab = gguf.GGUFReader(os.path.join(a.src, "models", "ggml-vocab-llama-spm.gguf"))
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random-llama-{a.layers}x{a.embd}-ff{a.ff}-{a.type}-seed{a.seed}")
    w.add_context_length(2048)
    w.add_embedding_length(a.embd)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[a.type])
    token_types = None
    n_vocab = 0
    for name, field in vocab.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            val = field.contents()
            w.add_key_value(name, val, vtype, sub_type=field.types[-1])
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(val)
            if name == "tokenizer.ggml.token_type":
                token_types = np.array(val)
        else:
            w.add_key_value(name, field.contents(), vtype)
    w.add_vocab_size(n_vocab)

    rng = np.random.default_rng(a.seed)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[a.type]

    def weight(name: str, rows: int, cols: int, silence=None) -> None:
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * a.std)
        if silence is not None:
            x[silence] = 0
        if a.type == "f16":
            w.add_tensor(name, x.astype(np.float16))
        elif a.type == "f32":
            w.add_tensor(name, x)
        else:
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(a.embd, dtype=np.float32))

    kv_dim = head_dim * kv_heads
    weight("token_embd.weight", n_vocab, a.embd)
    for i in range(a.layers):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", a.embd, a.embd)
        weight(f"blk.{i}.attn_k.weight", kv_dim, a.embd)
        weight(f"blk.{i}.attn_v.weight", kv_dim, a.embd)
        weight(f"blk.{i}.attn_output.weight", a.embd, a.embd)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", a.ff, a.embd)
        weight(f"blk.{i}.ffn_up.weight", a.ff, a.embd)
        weight(f"blk.{i}.ffn_down.weight", a.embd, a.ff)
    norm("output_norm.weight")
    # random logits for byte/control tokens make llama-server emit invalid UTF-8 (HTTP 500)
    silence = None if token_types is None else ~np.isin(token_types, [1, 4])
    weight("output.weight", n_vocab, a.embd, silence)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: {os.path.getsize(a.out) / 1048576:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
