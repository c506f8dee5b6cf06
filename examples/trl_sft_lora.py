"""TRL supervised fine-tuning with LoRA on long sequences: trl.SFTTrainer with a SeCO (or SpaCO) step.

    # no model at hand: a small random byte-level Llama, trained on the Python stdlib's sources
    python examples/trl_sft_lora.py --seq-len 4096 --chunk-size 512 --steps 10
    # your model (a directory with weights and tokenizer) and a text file, one document per line
    python examples/trl_sft_lora.py --model ./my-llama --text docs.txt --seq-len 32768 --chunk-size 4096
    # TRL's padding-free packing (bfd): documents of mixed lengths packed into rows of --seq-len tokens
    python examples/trl_sft_lora.py --pack --seq-len 4096 --chunk-size 512 --steps 10

SeqwrapSFTTrainer (seqwrap.integrations) is a drop-in for trl.SFTTrainer: SFTConfig, datasets,
peft_config and logging keep their meaning; the training step runs the engine, so no (tokens, vocab)
logits and only one chunk of activations are ever held. The bar shows loss and tokens/s; the LoRA
adapter is saved to --output.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="model directory (weights + tokenizer) or 'random'")
    p.add_argument("--text", default=None, help="text file, one document per line (default: Python stdlib sources)")
    p.add_argument("--engine", choices=["seco", "spaco"], default="seco")
    p.add_argument("--rate", type=float, default=0.25, help="SpaCO: fraction of chunks backpropagated")
    p.add_argument("--seq-len", type=int, default=4096, help="SFTConfig.max_length")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--docs", type=int, default=16, help="stdlib corpus: documents of --seq-len bytes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--output", default="sft-lora-adapter")
    p.add_argument("--pack", action="store_true",
                   help="TRL packing, strategy 'bfd' (padding-free rows of several documents); the stdlib corpus "
                        "then has documents of mixed lengths")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def byte_tokenizer():
    """A byte-level tokenizer built in memory: 256 byte tokens + <pad>, <s>, </s> (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load(args):
    """(model, tokenizer)."""
    import transformers

    if args.model != "random":
        path = Path(args.model)
        return (transformers.AutoModelForCausalLM.from_pretrained(path),
                transformers.AutoTokenizer.from_pretrained(path))
    tok = byte_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max(2048, args.seq_len + 1),
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config), tok


def documents(args) -> list[str]:
    if args.text:
        return [line for line in Path(args.text).read_text().splitlines() if line.strip()]
    from seqwrap.data import random_windows, stdlib_bytes

    g = torch.Generator().manual_seed(args.seed)
    windows = random_windows(stdlib_bytes(), args.docs, args.seq_len - 2, g)
    docs = [bytes(w.tolist()).decode("latin-1") for w in windows]
    if args.pack:  # documents of 1/8 to 1/2 of a row: bfd puts several into each packed row
        cut = torch.randint(args.seq_len // 8, args.seq_len // 2, (len(docs),), generator=g).tolist()
        docs = [d[:n] for d, n in zip(docs, cut)] + [d[n:] for d, n in zip(docs, cut)]
    return docs


def progress_callback(total_steps: int):
    """A TrainerCallback with a tqdm bar: loss and tokens/s (SFT's num_tokens metric over wall time)."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar, self.start = tqdm(total=total_steps, unit="step", desc="SFT+LoRA"), time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                tok_s = float(logs.get("num_tokens", 0)) / (time.perf_counter() - self.start)
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", tok_s=f"{tok_s:,.0f}")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return Progress()


def main(argv=None) -> float:
    args = parse_args(argv)
    import peft
    import trl
    from datasets import Dataset

    from seqwrap.integrations import SeqwrapSFTTrainer

    model, tok = load(args)
    config = trl.SFTConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=1,
                           max_length=args.seq_len, packing=args.pack, packing_strategy="bfd",
                           dataset_text_field="text", report_to=[],
                           save_strategy="no", seed=args.seed, disable_tqdm=True, gradient_checkpointing=False,
                           use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())
    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    extra = {"rate": args.rate, "seed": args.seed} if args.engine == "spaco" else {}
    trainer = SeqwrapSFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": documents(args)}),
                                processing_class=tok, peft_config=lora, callbacks=[progress_callback(args.steps)],
                                seqwrap_engine=args.engine, seqwrap_chunk_size=args.chunk_size, seqwrap_options=extra)
    trainer.train()
    trainer.model.save_pretrained(args.output)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rows = "packed padding-free rows (bfd)" if args.pack else "one document per row"
    print(f"final loss {losses[-1]:.4f} after {args.steps} steps, {rows}; adapter saved to {args.output}")
    return float(losses[-1])


if __name__ == "__main__":
    main()
