"""DPO with LoRA on long preference pairs: trl.DPOTrainer with an exact chunked (SeCO) step.

    # no model at hand: a small random byte-level Llama; prompts are long windows of the Python stdlib's
    # sources, the chosen completion is the text that follows, the rejected one the same bytes shuffled
    python examples/dpo_long_lora.py --seq-len 8192 --chunk-size 1024 --steps 10
    # your model (a directory with weights and tokenizer)
    python examples/dpo_long_lora.py --model ./my-llama --seq-len 32768 --chunk-size 4096

SeqwrapDPOTrainer (seqwrap.integrations) is a drop-in for trl.DPOTrainer: DPOConfig (loss_type, beta, ...),
the preference dataset, peft_config and logging keep their meaning. The reference log-probs (here: the model with
its adapter disabled) and the policy's are summed chunk by chunk; the DPO loss of the sums is backpropagated
exactly, one chunk of activations at a time. The bar shows loss, reward margin and tokens/s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_sft_lora import load  # noqa: E402  (the random byte-level Llama and its tokenizer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="model directory (weights + tokenizer) or 'random'")
    p.add_argument("--seq-len", type=int, default=4096, help="prompt + completion tokens of each sequence")
    p.add_argument("--completion", type=int, default=256, help="tokens of each completion (chosen and rejected)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs in the dataset")
    p.add_argument("--loss-type", default="sigmoid", help="DPOConfig.loss_type (e.g. sigmoid, ipo, hinge)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--output", default="dpo-lora-adapter")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def preference_pairs(args) -> dict[str, list[str]]:
    """prompt: a window of stdlib source bytes; chosen: the bytes that follow it; rejected: those bytes shuffled."""
    from seqwrap.data import random_windows, stdlib_bytes

    g = torch.Generator().manual_seed(args.seed)
    prompt_len = args.seq_len - args.completion - 1  # room for the EOS DPOTrainer appends
    windows = random_windows(stdlib_bytes(), args.pairs, prompt_len + args.completion, g)
    text = [bytes(w.tolist()).decode("latin-1") for w in windows]
    out = {"prompt": [], "chosen": [], "rejected": []}
    for t in text:
        tail = t[prompt_len:]
        out["prompt"].append(t[:prompt_len])
        out["chosen"].append(tail)
        out["rejected"].append("".join(tail[i] for i in torch.randperm(len(tail), generator=g).tolist()))
    return out


def progress_callback(total_steps: int):
    """A TrainerCallback with a tqdm bar: loss, reward margin and tokens/s (DPO's num_tokens over wall time)."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar, self.start = tqdm(total=total_steps, unit="step", desc="DPO+LoRA"), time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                tok_s = float(logs.get("num_tokens", 0)) / (time.perf_counter() - self.start)
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}",
                                     margin=f"{float(logs.get('rewards/margins', 0)):.3g}", tok_s=f"{tok_s:,.0f}")

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

    from seqwrap.integrations import SeqwrapDPOTrainer

    model, tok = load(args)
    config = trl.DPOConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=1,
                           max_length=args.seq_len, loss_type=[args.loss_type], beta=args.beta, report_to=[],
                           save_strategy="no", seed=args.seed, disable_tqdm=True, gradient_checkpointing=False,
                           use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())
    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SeqwrapDPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(preference_pairs(args)),
                                processing_class=tok, peft_config=lora, callbacks=[progress_callback(args.steps)],
                                seqwrap_chunk_size=args.chunk_size)
    trainer.train()
    trainer.model.save_pretrained(args.output)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"final DPO loss {losses[-1]:.4f} after {args.steps} steps; adapter saved to {args.output}")
    return float(losses[-1])


if __name__ == "__main__":
    main()
