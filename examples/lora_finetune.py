"""LoRA fine-tuning on long sequences with SeCO (exact) or SpaCO (sparse, unbiased).

    # your model and your text files
    python examples/lora_finetune.py --model ./my-llama --text 'data/*.txt' --seq-len 32768 --chunk-size 4096
    # no model at hand: a random small Llama from a config, trained on the Python stdlib's sources
    python examples/lora_finetune.py --seq-len 4096 --chunk-size 512 --steps 20 --engine spaco --rate 0.25
    # packed: every file (or stdlib module) one document, documents packed into rows of --seq-len tokens
    python examples/lora_finetune.py --pack --seq-len 16384 --chunk-size 1024 --steps 20

--model is a model directory (config + weights + tokenizer), a config.json (random
weights, byte-level tokens), or "random" (a small Llama config). Each optimizer step
accumulates --grad-accum sequences of --seq-len tokens; the bar shows loss, tokens/s
and peak memory. The LoRA adapter is saved to --output at the end.

--pack trains on whole documents instead of random windows: each text file (each module of the
stdlib by default) is one document, seqwrap.data.pack_documents packs them into rows of --seq-len
tokens (longer ones are split), and every row goes to the engine with its document boundaries, so no
token attends to or is predicted from another document.
"""
from __future__ import annotations

import argparse
import glob
import math
import resource
import sys
import time
from pathlib import Path

import torch

import seqwrap
from seqwrap.data import pack_documents, random_windows, stdlib_bytes, stdlib_documents


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="model dir, config.json, or 'random'")
    p.add_argument("--text", nargs="*", default=[], help="text files or globs (default: the Python stdlib sources)")
    p.add_argument("--engine", choices=["seco", "spaco"], default="seco")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--rate", type=float, default=0.25, help="SpaCO: fraction of chunks backpropagated")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--grad-accum", type=int, default=1, help="sequences (packed rows) per optimizer step")
    p.add_argument("--pack", action="store_true",
                   help="whole documents (one per file) packed into rows of --seq-len tokens, with their boundaries")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--gradient-checkpointing", action="store_true", help="also checkpoint layers inside a chunk")
    p.add_argument("--offload", action="store_true",
                   help="keep past K/V, their gradients and parked activations in pinned host memory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="lora-adapter")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_model(args, dtype):
    """(model, tokenize(str) -> 1-D LongTensor or None for byte-level)."""
    import transformers

    path = Path(args.model)
    if args.model == "random":
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=max(args.seq_len, 2048))
        return transformers.LlamaForCausalLM(config).to(dtype), None
    if path.is_file():  # a config: random weights, byte-level tokens
        config = transformers.AutoConfig.from_pretrained(str(path))
        if config.vocab_size < 256:
            sys.exit(f"{path}: vocab_size {config.vocab_size} < 256 cannot hold byte-level tokens")
        return transformers.AutoModelForCausalLM.from_config(config).to(dtype), None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return model, lambda text: torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def load_corpus(args, tokenize) -> torch.Tensor:
    files = sorted(f for pattern in args.text for f in glob.glob(pattern))
    if args.text and not files:
        sys.exit(f"no file matches {args.text}")
    if not files:
        data = stdlib_bytes(max(4 << 20, 4 * args.seq_len))
        return data.long() if tokenize is None else tokenize(bytes(data.tolist()).decode("utf-8", "replace"))
    text = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    if tokenize is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return tokenize(text)


def load_documents(args, tokenize) -> list[torch.Tensor]:
    """One document per text file (default: per module of the Python stdlib), as 1-D token tensors."""
    files = sorted(f for pattern in args.text for f in glob.glob(pattern))
    if args.text and not files:
        sys.exit(f"no file matches {args.text}")
    if files:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        raw = stdlib_documents(max(4 << 20, 4 * args.seq_len))
        if tokenize is None:
            return [d.long() for d in raw]
        texts = [bytes(d.tolist()).decode("utf-8", "replace") for d in raw]
    if tokenize is None:
        return [torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8).long() for t in texts if t]
    return [tokenize(t) for t in texts if t]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenize = load_model(args, dtype)
    if args.pack:
        packed = pack_documents(load_documents(args, tokenize), args.seq_len, overflow="split")
        print(f"packed {sum(len(p) > 0 for p in packed.placement)} documents into {packed.input_ids.shape[0]} rows "
              f"of {args.seq_len} tokens ({packed.fill:.1%} filled)")
    else:
        corpus = load_corpus(args, tokenize)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=args.target_modules.split(","))).to(device)
    if args.gradient_checkpointing:
        seqwrap.hf.enable_checkpointing(model)  # non-reentrant, with either transformers API name
    model.train()
    if args.engine == "seco":
        engine = seqwrap.SeCO(model, chunk_size=args.chunk_size, offload=args.offload)
    else:
        engine = seqwrap.SpaCO(model, chunk_size=args.chunk_size, rate=args.rate, seed=args.seed,
                               offload=args.offload)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc=f"{args.engine} chunk {args.chunk_size}")
    tokens, start = 0, time.perf_counter()
    order = []
    for _ in bar:
        loss = 0.0
        if args.pack:  # the next --grad-accum rows of a shuffled pass over the packed rows
            while len(order) < args.grad_accum:
                order += torch.randperm(packed.input_ids.shape[0], generator=gen).tolist()
            rows, order = order[:args.grad_accum], order[args.grad_accum:]
            # one normaliser for the whole optimizer step: the counted labels of all its rows
            num_items = sum(int((packed.labels[r, 1:] != -100).sum()) for r in rows)
            for r in rows:
                out = engine(**{k: v.to(device) for k, v in packed.rows(r).items()}, num_items=num_items)
                loss += out.loss.item()
                tokens += out.num_tokens
        else:
            windows = random_windows(corpus, args.grad_accum, args.seq_len, gen).to(device)
            # one normaliser for the whole optimizer step: every micro-batch divides by all its labels
            num_items = args.grad_accum * (args.seq_len - 1)
            for seq in windows:
                out = engine(seq[None], num_items=num_items)
                loss += out.loss.item()
                tokens += out.num_tokens
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 20)):.1f}",
                        tok_s=f"{tokens / elapsed:.0f}", peak_mb=f"{peak_memory_mb(device):.0f}")
    model.save_pretrained(args.output)
    print(f"adapter saved to {args.output}")
    return loss


if __name__ == "__main__":
    main()
