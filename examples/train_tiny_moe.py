"""Train the tiny Mixtral-architecture MoE (and its tokenizer) that moetool is demonstrated on.

The model is small enough to train on two CPU cores in about ten minutes, yet it is trained on
real text of three domains (code, prose, data; see ``build_corpus.py``), so its routers route
by content instead of noise. The script:

1. trains a byte-level BPE tokenizer on the train split and wraps it as a transformers
   ``PreTrainedTokenizerFast`` (loadable offline with ``AutoTokenizer``);
2. trains ``MixtralForCausalLM`` with AdamW, a warmup + cosine schedule and the Switch
   load-balancing auxiliary loss, on random windows of the tokenized train split;
3. measures heldout perplexity (overall and per domain) and the per-domain top-1 expert usage
   of every layer;
4. saves the model, tokenizer and ``TRAINING.json`` with ``save_pretrained``.

``--dense`` trains a dense ``MistralForCausalLM`` with the same attention, embedding and depth
instead, with an MLP of ``--intermediate-size`` (a baseline for distillation experiments).

Usage::

    python examples/train_tiny_moe.py                      # writes examples/tiny-moe/
    python examples/train_tiny_moe.py --steps 50 --out /tmp/smoke
    python examples/train_tiny_moe.py --dense --intermediate-size 512   # writes examples/tiny-dense/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

HERE = Path(__file__).resolve().parent
DOMAINS = ("code", "prose", "data")
# One token both separates documents (EOS) and starts a prompt (BOS), as in GPT-2: training
# windows always see a document start right after it, so prompts that begin with it are
# in-distribution. Padding gets its own token so it can never be confused with a boundary.
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Windows per forward pass during evaluation.
EVAL_BATCH = 8


# --------------------------------------------------------------------------------------------
# Data and tokenizer
# --------------------------------------------------------------------------------------------


def load_jsonl(path: Path) -> list[dict[str, str]]:
    """Read a JSON Lines corpus file with ``text`` and ``domain`` fields."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, seq_len: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    Args:
        texts: Training texts.
        vocab_size: Total vocabulary size, special tokens included.
        seq_len: Context length the model is trained on, stored as ``model_max_length``.

    Returns:
        A fast tokenizer that prepends the BOS token when ``add_special_tokens`` is true.
    """
    tokenizer = Tokenizer(models.BPE())
    # Byte level: every string is encodable (code, Unicode tables) with no unknown token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eos_id = tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=seq_len,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Tokenize texts into one stream: ``EOS doc1 EOS doc2 EOS ...``.

    Args:
        tokenizer: The trained tokenizer.
        texts: Documents, in order.

    Returns:
        A 1-D ``int64`` tensor of token ids.
    """
    eos = tokenizer.eos_token_id
    ids = [eos]
    for doc_ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(doc_ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save the tokenizer so that both transformers 4.x and 5.x load it with ``AutoTokenizer``.

    transformers 5 records its internal class name ``TokenizersBackend``, which 4.x does not
    know; ``PreTrainedTokenizerFast`` names the same tokenizer in both major versions.
    """
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Create a freshly initialised Mixtral MoE, or a dense Mistral with ``--dense``.

    Args:
        args: Parsed command-line arguments (shape settings).
        tokenizer: The trained tokenizer, for vocabulary size and special token ids.

    Returns:
        The model in training mode.
    """
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": args.seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_window": None,
        # Tied embeddings keep the float32 checkpoint under 20 MB; a 4k vocabulary would
        # otherwise spend a quarter of all parameters on a second embedding matrix.
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if args.dense:
        return MistralForCausalLM(MistralConfig(**common))
    config = MixtralConfig(
        **common,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
    )
    return MixtralForCausalLM(config)


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Count total parameters and parameters active per token (top-k of the experts).

    Args:
        model: A Mixtral or Mistral causal LM.

    Returns:
        ``{"total": ..., "active_per_token": ...}``; tied weights are counted once.
    """
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    experts = getattr(config, "num_local_experts", 0)
    if not experts:
        return {"total": total, "active_per_token": total}
    per_expert = 3 * config.hidden_size * config.intermediate_size
    idle = config.num_hidden_layers * (experts - config.num_experts_per_tok) * per_expert
    return {"total": total, "active_per_token": total - idle}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def make_optimizer(model: PreTrainedModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; norms' gains are not decayed."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``batch_size`` windows of ``seq_len`` tokens at random offsets of the stream."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def print_progress(entry: dict[str, float], steps: int) -> None:
    """Print one log entry of :func:`train` to stderr."""
    print(
        f"step {entry['step']:5d}/{steps}  loss {entry['lm_loss']:.4f}  aux {entry['aux_loss']:.4f}  "
        f"lr {entry['lr']:.2e}  {entry['tokens_per_s']:.0f} tok/s  {entry['elapsed_s']:.0f}s",
        file=sys.stderr,
    )


def train(
    model: PreTrainedModel, stream: torch.Tensor, args: argparse.Namespace
) -> tuple[list[dict[str, float]], float]:
    """Train the model in place.

    Args:
        model: The freshly initialised model.
        stream: Tokenized train split.
        args: Parsed command-line arguments (optimisation settings).

    Returns:
        ``(log, seconds)``: the logged loss curve and the wall time of the training loop.
    """
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    moe = not args.dense
    # output_router_logits makes Mixtral add coef * Switch load-balancing loss to ``.loss``.
    extra = {"output_router_logits": True} if moe else {}
    coef = model.config.router_aux_loss_coef if moe else 0.0
    log: list[dict[str, float]] = []
    window = {"lm": 0.0, "aux": 0.0, "n": 0}
    model.train()
    start = last = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = sample_batch(stream, args.batch_size, args.seq_len, generator)
        out = model(input_ids=batch, labels=batch, **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        aux = out.aux_loss.item() if moe else 0.0
        window["lm"] += out.loss.item() - coef * aux
        window["aux"] += aux
        window["n"] += 1
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            entry = {
                "step": step,
                "lm_loss": window["lm"] / window["n"],
                "aux_loss": window["aux"] / window["n"],
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window["n"] * args.batch_size * args.seq_len / (now - last),
                "elapsed_s": now - start,
            }
            log.append(entry)
            print_progress(entry, args.steps)
            window = {"lm": 0.0, "aux": 0.0, "n": 0}
            last = now
    return log, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_stream(model: PreTrainedModel, stream: torch.Tensor, seq_len: int, batch_size: int) -> dict[str, object]:
    """Causal LM loss and top-1 expert counts over non-overlapping windows of a token stream.

    Args:
        model: The trained model.
        stream: Tokenized heldout text.
        seq_len: Window length; each window predicts its tokens after the first.
        batch_size: Windows per forward pass.

    Returns:
        ``{"loss", "perplexity", "tokens", "top1_counts", "topk_counts"}``.
        ``top1_counts[layer][expert]`` is the number of tokens whose highest-scoring expert in
        that layer was ``expert``; ``topk_counts`` counts every top-k selection, i.e. the
        expert's actual load. Both are ``None`` for a dense model.
    """
    model.eval()
    moe = hasattr(model.config, "num_local_experts")
    extra = {"output_router_logits": True} if moe else {}
    full = len(stream) // seq_len
    batches = list(stream[: full * seq_len].view(full, seq_len).split(batch_size))
    if len(stream) - full * seq_len >= 2:  # the shorter last window runs on its own
        batches.append(stream[full * seq_len :][None])
    nll, tokens = 0.0, 0
    if moe:
        shape = (model.config.num_hidden_layers, model.config.num_local_experts)
        top1, topk = torch.zeros(shape), torch.zeros(shape)
    for ids in batches:
        out = model(input_ids=ids, **extra)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        nll += float(torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum"))
        tokens += ids[:, 1:].numel()
        if moe:
            for layer, router_logits in enumerate(out.router_logits):
                experts = router_logits.topk(model.config.num_experts_per_tok, dim=-1).indices
                top1[layer] += torch.bincount(experts[:, 0], minlength=shape[1]).float()
                topk[layer] += torch.bincount(experts.flatten(), minlength=shape[1]).float()
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "top1_counts": top1.long().tolist() if moe else None,
        "topk_counts": topk.long().tolist() if moe else None,
    }


def jensen_shannon(p: list[int], q: list[int]) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between two count vectors."""
    tp, tq = sum(p), sum(q)
    pa = [x / tp for x in p]
    qa = [x / tq for x in q]
    mid = [(a + b) / 2 for a, b in zip(pa, qa, strict=True)]

    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    return (kl(pa, mid) + kl(qa, mid)) / 2


def routing_summary(per_domain: dict[str, dict[str, object]]) -> dict[str, object]:
    """Summarise how top-1 routing differs between domains, layer by layer.

    Args:
        per_domain: Evaluation results per domain from :func:`evaluate_stream`.

    Returns:
        Per-layer top-1 and top-k (load) shares per domain, each domain's most used expert per
        layer, and the Jensen-Shannon divergence between the domains' top-1 distributions
        (0 means identical routing, 1 means disjoint experts).
    """
    layers = len(next(iter(per_domain.values()))["top1_counts"])
    shares, loads, favourite, divergence = {}, {}, {}, {}
    for domain, result in per_domain.items():
        counts = result["top1_counts"]
        shares[domain] = _normalise_rows(counts)
        loads[domain] = _normalise_rows(result["topk_counts"])
        favourite[domain] = [max(range(len(row)), key=row.__getitem__) for row in counts]
    names = list(per_domain)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            divergence[f"{a}/{b}"] = [
                round(jensen_shannon(per_domain[a]["top1_counts"][k], per_domain[b]["top1_counts"][k]), 4)
                for k in range(layers)
            ]
    return {
        "top1_share": shares,
        "topk_share": loads,
        "most_used_expert": favourite,
        "js_divergence_bits": divergence,
    }


def _normalise_rows(counts: list[list[int]]) -> list[list[float]]:
    """Turn per-layer counts into per-layer shares, rounded for a readable report."""
    return [[round(c / sum(row), 4) for c in row] for row in counts]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="folder with train/heldout.jsonl")
    parser.add_argument("--out", type=Path, help="output folder (default examples/tiny-moe or tiny-dense)")
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and tokenizers")
    parser.add_argument("--dense", action="store_true", help="train a dense Mistral instead of the MoE")
    parser.add_argument("--intermediate-size", type=int, help="MLP/expert width (default 256 MoE, 512 dense)")
    parser.add_argument("--hidden-size", type=int, default=160)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss weight")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.intermediate_size is None:
        # 512 = top-2 x 256: the dense baseline matches the MoE's active MLP width per token.
        args.intermediate_size = 512 if args.dense else 256
    if args.out is None:
        args.out = HERE / ("tiny-dense" if args.dense else "tiny-moe")
    return args


def seed_everything(seed: int, threads: int) -> None:
    """Fix seeds and thread counts so a rerun on the same machine repeats the run."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def evaluate_heldout(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, docs: list[dict[str, str]], seq_len: int
) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """Evaluate on the whole heldout split and on each domain's part of it.

    Args:
        model: The trained model.
        tokenizer: The trained tokenizer.
        docs: Heldout documents with ``text`` and ``domain``.
        seq_len: Evaluation window length.

    Returns:
        ``(overall, per_domain)`` results of :func:`evaluate_stream`.
    """
    overall = evaluate_stream(model, token_stream(tokenizer, [d["text"] for d in docs]), seq_len, EVAL_BATCH)
    per_domain = {
        domain: evaluate_stream(
            model, token_stream(tokenizer, [d["text"] for d in docs if d["domain"] == domain]), seq_len, EVAL_BATCH
        )
        for domain in DOMAINS
    }
    return overall, per_domain


def portable_path(path: Path) -> str:
    """Show a path relative to the repository when it is inside it, so reports are machine independent."""
    try:
        return path.resolve().relative_to(HERE.parent).as_posix()
    except ValueError:
        return str(path)


def build_report(
    args: argparse.Namespace,
    model: PreTrainedModel,
    train_tokens: int,
    log: list[dict[str, float]],
    heldout: tuple[dict[str, object], dict[str, dict[str, object]]],
    wall_times: dict[str, float],
) -> dict[str, object]:
    """Assemble the contents of ``TRAINING.json``.

    Args:
        args: Parsed command-line arguments.
        model: The trained model.
        train_tokens: Length of the tokenized train split.
        log: Loss curve from :func:`train`.
        heldout: ``(overall, per_domain)`` from :func:`evaluate_heldout`.
        wall_times: Seconds per phase.

    Returns:
        A JSON-serialisable report.
    """
    overall, per_domain = heldout
    metrics = ("loss", "perplexity", "tokens")
    usage = None
    if not args.dense:
        usage = {
            "top1_counts": {d: r["top1_counts"] for d, r in per_domain.items()},
            "topk_counts": {d: r["topk_counts"] for d, r in per_domain.items()},
            # Load over all heldout tokens: shows how evenly each layer's experts are used.
            "topk_share_all_domains": _normalise_rows(overall["topk_counts"]),
            **routing_summary(per_domain),
        }
    return {
        "model_class": type(model).__name__,
        "parameters": parameter_counts(model),
        "settings": {k: portable_path(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())},
        "tokens_per_step": args.batch_size * args.seq_len,
        "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_stream_tokens": train_tokens,
        # The median is robust to other processes competing for the CPU during some windows.
        "median_tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in log)),
        # Mean LM loss (without the auxiliary loss) over the last two logging windows.
        "final_train_loss": sum(e["lm_loss"] for e in log[-2:]) / len(log[-2:]),
        "loss_curve": [{k: round(v, 4) for k, v in e.items()} for e in log],
        "heldout": {
            "overall": {k: overall[k] for k in metrics},
            "per_domain": {d: {k: r[k] for k in metrics} for d, r in per_domain.items()},
        },
        "expert_usage": usage,
        "wall_time_s": {k: round(v, 1) for k, v in wall_times.items()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate and save the model; see the module docstring."""
    args = parse_args(argv)
    # The tokenizers thread pool reads this once, on first use.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    seed_everything(args.seed, args.threads)
    wall_start = time.perf_counter()

    train_docs = load_jsonl(args.data / "train.jsonl")
    heldout_docs = load_jsonl(args.data / "heldout.jsonl")
    tokenizer = train_tokenizer([d["text"] for d in train_docs], args.vocab_size, args.seq_len)
    train_ids = token_stream(tokenizer, [d["text"] for d in train_docs])
    wall_times = {"tokenizer": time.perf_counter() - wall_start}
    print(f"tokenizer: {len(tokenizer)} tokens, train stream {len(train_ids)} tokens", file=sys.stderr)

    model = build_model(args, tokenizer)
    print(f"model: {type(model).__name__} {parameter_counts(model)}", file=sys.stderr)
    log, wall_times["training"] = train(model, train_ids, args)

    eval_start = time.perf_counter()
    heldout = evaluate_heldout(model, tokenizer, heldout_docs, args.seq_len)
    wall_times["evaluation"] = time.perf_counter() - eval_start
    print(f"heldout perplexity: {heldout[0]['perplexity']:.2f}", file=sys.stderr)
    for domain, result in heldout[1].items():
        print(f"  {domain:5s} perplexity: {result['perplexity']:.2f}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    wall_times["total"] = time.perf_counter() - wall_start
    report = build_report(args, model, len(train_ids), log, heldout, wall_times)
    (args.out / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"saved to {args.out} in {wall_times['total']:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
