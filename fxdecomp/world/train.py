"""Train the world's two tiny models on CPU and write their weights + records into the package.

    python -m fxdecomp.world.train subject [--n 2048 --pretrain-epochs 40 --epochs 4 --seed 0]
    python -m fxdecomp.world.train clip    [--n 12000 --epochs 8 --seed 0]

subject: a conv-stem timm ViT (``SUBJECT_STEM``, ``SUBJECT_CONFIG``) trained in two stages, as
Waterbirds models are (generic pretraining, then the task):

1. pretraining stand-in: ``--pretrain-epochs`` of cross-entropy on the **8-way shape** label
   (``--pretrain-label shape``; the label family the task's binary label derives from) over the
   unbiased ``train`` split, with an 8-way head;
2. the task: a new 2-way head and ``--epochs`` of cross-entropy on round vs angular over the
   ``spurious-train`` split (background agrees with the label in 95% of the images), peak
   learning rate ``--finetune-lr``.

Every epoch draws ``--n`` fresh images (seed ``seed * 1000 + epoch``, counting on over both
stages), so nothing is memorised. The subject is never told color, texture or background.
(``--pretrain-label angular`` is the earlier recipe: the binary label in both stages; the model
then separates round from angular but not the 8 shapes. A ViT trained from scratch on the
spurious split alone learns only the background cue: balanced accuracy 0.50 after 10 epochs.)
Evaluated on the balanced test split (accuracy and worst-group accuracy over the four label x
background-group groups); the record also holds stage 1's 8-way shape accuracy on ``test``.

clip: the tiny CLIP (``CLIP_CONFIG``) trained contrastively on texts about the training images:
each image gets either its full caption or one attribute phrase ("red color", ...), at random.
The loss is a multi-positive InfoNCE: text j is a positive for image i whenever every attribute
the text names has i's value (so "red color" is a positive for every red image in the batch).
Evaluated by zero-shot classification of each attribute on the test split with
``attribute_prompts`` (one phrase per value, no template). ``--phrase-weights`` sets how often
each attribute's phrase is the text; ``--init`` continues from an earlier run's weights (its
record is embedded in the new one). The shipped CLIP is two runs: ``clip --threads 1`` (8
epochs; zero-shot shape 0.15: contrastive training on these texts learns color, texture and
background long before shape), then ``clip --threads 2 --init <run 1>/clip.safetensors --epochs
5 --p-full 0.2 --phrase-weights 0.1 0.1 0.7 0.1`` (shape 0.36).

Each run writes ``weights/{subject,clip}.safetensors`` and a JSON record: the exact command,
seed, data sizes, seconds, accuracies on the evaluation set, and the same accuracies on its first
``CHECK_N`` images (what ``tests/test_world.py`` re-evaluates).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fxdecomp.world.generate import ATTRIBUTES, World, generate
from fxdecomp.world.models import (CLIP_CONFIG, SUBJECT_CONFIG, SUBJECT_STEM, WEIGHTS_DIR, WorldTokenizer,
                                   attribute_prompts, build_clip, build_subject)

EVAL_SEED = 1
CHECK_N = 512
#: how often each attribute's phrase is the text of an image (color, texture, shape, background):
#: shape is the hardest to see, so it is named most often
PHRASE_WEIGHTS = (0.15, 0.25, 0.4, 0.2)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _predict(model, world: World, batch: int) -> np.ndarray:
    """The classifier's argmax class [N] for every image of ``world`` (eval mode)."""
    model.eval()
    x = world.tensor()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch].to(dev)).argmax(-1).cpu()
                      for i in range(0, len(x), batch)]).numpy()


def subject_accuracy(model, world: World, batch: int = 256) -> dict:
    """Accuracy on ``world``'s ``angular`` label, and per (label, background group) group."""
    pred = _predict(model, world, batch)
    y = world.codes("angular")
    land = np.array([r["background"] in ("grass", "sand") for r in world.records])
    groups = {}
    for label in (0, 1):
        for g, name in ((True, "land"), (False, "water")):
            sel = (y == label) & (land == g)
            if sel.any():
                groups[f"{'angular' if label else 'round'}/{name}"] = float((pred[sel] == y[sel]).mean())
    return {"accuracy": float((pred == y).mean()), "worst_group_accuracy": min(groups.values()),
            "group_accuracy": groups, "n": len(y)}


@torch.no_grad()
def clip_zero_shot(clip, tokenizer, world: World, batch: int = 256) -> dict:
    """Zero-shot accuracy per attribute with ``attribute_prompts``."""
    clip.eval()
    x = world.tensor()
    dev = next(clip.parameters()).device
    img = torch.cat([F.normalize(clip.encode_image(x[i:i + batch].to(dev)), dim=-1).cpu()
                     for i in range(0, len(x), batch)])
    out = {}
    for attr in ATTRIBUTES:
        txt = F.normalize(clip.encode_text(tokenizer(attribute_prompts(attr)).to(dev)), dim=-1).cpu()
        pred = (img @ txt.T).argmax(-1).numpy()
        out[attr] = float((pred == world.codes(attr)).mean())
    return out


# ---------------------------------------------------------------------------- training
def _schedule(opt, step: int, total: int, lr: float, warmup: int) -> None:
    scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                   / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr * scale


def shape_accuracy(model, world: World, batch: int = 256) -> float:
    """Accuracy of an 8-way shape head (the pretraining stage) on ``world``."""
    return float((_predict(model, world, batch) == world.codes("shape")).mean())


def _fit_stage(model, args, split: str, label: str, epochs: int, lr: float, seed_offset: int,
               g: torch.Generator, t0: float) -> None:
    """``epochs`` epochs of cross-entropy on ``label`` (its codes), a fresh draw of ``args.n``
    images of ``split`` every epoch (seed ``args.seed * 1000 + seed_offset + epoch``), AdamW with
    warmup and a cosine decay over the stage."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(args.n / args.batch)
    step = 0
    for epoch in range(epochs):
        data = generate(args.n, seed=args.seed * 1000 + seed_offset + epoch, split=split,
                        workers=args.workers)
        x, y = data.tensor(), torch.from_numpy(data.codes(label))
        model.train()
        perm = torch.randperm(len(x), generator=g)
        losses = []
        for i in range(0, len(x), args.batch):
            idx = perm[i:i + args.batch]
            _schedule(opt, step, steps, lr, warmup=max(1, steps // 20))
            loss = F.cross_entropy(model(x[idx].to(args.device)), y[idx].to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        print(f"epoch {epoch + 1}/{epochs} ({split}, {label}) loss {np.mean(losses):.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


def train_subject(args) -> dict:
    test = generate(args.eval_n, seed=EVAL_SEED, split="balanced-test", workers=args.workers)
    model = build_subject(args.seed).to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    pretrain = {"split": "train", "label": args.pretrain_label, "epochs": args.pretrain_epochs,
                "lr": args.lr}
    if args.pretrain_epochs:
        # stage 1: the generic pretraining stand-in on the unbiased train split (every image
        # drawn afresh, so nothing is memorised); the label family the task's label derives from
        if args.pretrain_label == "shape":
            torch.manual_seed(args.seed + 1)
            model.reset_classifier(len(ATTRIBUTES["shape"]))
        _fit_stage(model, args, "train", args.pretrain_label, args.pretrain_epochs, args.lr,
                   0, g, t0)
        held = generate(args.eval_n, seed=EVAL_SEED, split="test", workers=args.workers)
        if args.pretrain_label == "shape":
            pretrain["test_shape_accuracy"] = shape_accuracy(model, held)
            torch.manual_seed(args.seed + 2)
            model.reset_classifier(SUBJECT_CONFIG["num_classes"])        # new binary head
        else:
            pretrain["balanced_test_accuracy"] = subject_accuracy(model, test)["accuracy"]
        pretrain["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"after pretraining: {pretrain}", flush=True)
    # stage 2: the task, round vs angular, on the spurious split (background agrees 95%)
    _fit_stage(model, args, "spurious-train", "angular", args.epochs, args.finetune_lr,
               args.pretrain_epochs, g, t0)
    seconds = time.perf_counter() - t0
    model.eval()
    metrics = subject_accuracy(model, test)
    check = subject_accuracy(model, generate(CHECK_N, seed=EVAL_SEED, split="balanced-test"))
    train_acc = subject_accuracy(model, generate(2000, seed=args.seed * 1000,
                                                 split="spurious-train"))
    record = {"model": "subject", "config": SUBJECT_CONFIG,
              "stem": {"channels": list(SUBJECT_STEM),
                       "stage": "conv3x3 stride 2, BatchNorm2d, ReLU", "embed": "timm HybridEmbed"},
              "recipe": "stage 1 (pretraining stand-in): cross-entropy on the pretrain label over "
                        "the unbiased train split; stage 2: a new 2-way head, cross-entropy on "
                        "round vs angular over spurious-train; every epoch a fresh draw. Never "
                        "told color, texture or background.",
              "pretrain": pretrain,
              "train_split": "spurious-train", "train_label": "angular",
              "train_n_per_epoch": args.n, "train_seeds": "seed * 1000 + (stage offset) + epoch",
              "epochs": args.epochs, "batch": args.batch, "finetune_lr": args.finetune_lr,
              "seed": args.seed, "seconds": round(seconds, 1),
              "eval": {"split": "balanced-test", "seed": EVAL_SEED, **metrics},
              "check": {"split": "balanced-test", "seed": EVAL_SEED, **check},
              "train_accuracy_first_2000": train_acc["accuracy"]}
    _save(model.state_dict(), "subject", record, args)
    return record


def _texts(records: list[dict], rng: np.random.Generator, p_full: float,
           phrase_weights=PHRASE_WEIGHTS):
    """One text per image (full caption or one attribute phrase) and which attributes it names."""
    attrs = list(ATTRIBUTES)
    texts, named = [], np.zeros((len(records), len(attrs)), bool)
    for i, r in enumerate(records):
        if rng.random() < p_full:
            texts.append(r["caption"])
            named[i] = True
        else:
            a = int(rng.choice(len(attrs), p=phrase_weights))
            texts.append(attribute_prompts(attrs[a])[ATTRIBUTES[attrs[a]].index(r[attrs[a]])])
            named[i, a] = True
    return texts, named


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, positive: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE in both directions with uniform targets over the positives.
    img, txt [B, E] unit rows; positive [B_img, B_txt] bool (the diagonal is always True)."""
    logits = logit_scale * img @ txt.T
    target = positive.float()
    i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (i2t + t2i) / 2


def train_clip(args) -> dict:
    data = generate(args.n, seed=args.seed, split="train", workers=args.workers)
    test = generate(args.eval_n, seed=EVAL_SEED, split="test", workers=args.workers)
    tokenizer = WorldTokenizer()
    clip = build_clip(tokenizer, args.seed)
    init = None
    if args.init:                       # continue from an earlier run's weights (and record it)
        from safetensors.torch import load_file
        clip.load_state_dict(load_file(args.init))
        init_record = Path(args.init).with_suffix(".json")
        init = {"weights": args.init, "record": json.loads(init_record.read_text())
                if init_record.is_file() else None}
    clip = clip.to(args.device)
    phrase_weights = np.asarray(args.phrase_weights, float) / np.sum(args.phrase_weights)
    x = data.tensor()
    codes = torch.from_numpy(np.stack([data.codes(a) for a in ATTRIBUTES], 1))       # [N, 4]
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    steps = args.epochs * (len(x) // args.batch)
    step, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        clip.train()
        perm = torch.randperm(len(x), generator=g)
        losses = []
        for i in range(0, len(x) - args.batch + 1, args.batch):
            idx = perm[i:i + args.batch]
            texts, named = _texts([data.records[j] for j in idx.tolist()], rng, args.p_full,
                                  phrase_weights)
            c = codes[idx]
            same = c[:, None, :] == c[None, :, :]                                    # [Bi, Bt, 4]
            positive = (same | ~torch.from_numpy(named)[None]).all(-1)
            _schedule(opt, step, steps, args.lr, warmup=steps // 20)
            img = F.normalize(clip.encode_image(x[idx].to(args.device)), dim=-1)
            txt = F.normalize(clip.encode_text(tokenizer(texts).to(args.device)), dim=-1)
            positive = positive.to(args.device)
            loss = multi_positive_clip_loss(img, txt, positive, clip.logit_scale.exp().clamp(max=100))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses):.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    record = {"model": "clip", "config": CLIP_CONFIG, "train_split": "train", "train_n": args.n,
              "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "p_full": args.p_full,
              "phrase_weights": dict(zip(ATTRIBUTES, phrase_weights.tolist())), "init": init,
              "seed": args.seed, "seconds": round(seconds, 1),
              "tokenizer": {"words": tokenizer.vocab[3:-1],
                            "context_length": tokenizer.context_length},
              "prompts": {a: attribute_prompts(a) for a in ATTRIBUTES},
              "eval": {"split": "test", "seed": EVAL_SEED, "n": args.eval_n,
                       "zero_shot_accuracy": clip_zero_shot(clip, tokenizer, test)},
              "check": {"split": "test", "seed": EVAL_SEED, "n": CHECK_N,
                        "zero_shot_accuracy": clip_zero_shot(
                            clip, tokenizer, generate(CHECK_N, seed=EVAL_SEED, split="test"))}}
    _save(clip.state_dict(), "clip", record, args)
    return record


def _save(state_dict: dict, which: str, record: dict, args) -> None:
    from safetensors.torch import save_file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
              str(out / f"{which}.safetensors"))
    record = {"command": "python -m fxdecomp.world.train " + " ".join(map(shlex.quote, args.argv)),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, **record}
    (out / f"{which}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("eval", "check", "seconds")}, indent=2))
    print(f"wrote {out / (which + '.safetensors')} and {which}.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxdecomp.world.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    for which, n, epochs, batch, lr in (("subject", 2048, 4, 128, 1e-3),
                                        ("clip", 12000, 8, 256, 2e-3)):
        s = sub.add_parser(which)
        s.add_argument("--n", type=int, default=n,
                       help="training images (subject: per epoch, freshly drawn each epoch)")
        s.add_argument("--eval-n", type=int, default=2000, help="evaluation images")
        s.add_argument("--epochs", type=int, default=epochs)
        s.add_argument("--batch", type=int, default=batch)
        s.add_argument("--lr", type=float, default=lr)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--workers", type=int, default=1, help="processes generating the world")
        s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        s.add_argument("--out", default=str(WEIGHTS_DIR))
        s.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
        if which == "subject":
            s.add_argument("--pretrain-epochs", type=int, default=40,
                           help="epochs of --pretrain-label on the unbiased train split first")
            s.add_argument("--pretrain-label", choices=("shape", "angular"), default="shape",
                           help="stage-1 label: the 8 shapes (then a new binary head) or "
                                "round/angular itself")
            s.add_argument("--finetune-lr", type=float, default=3e-4,
                           help="peak learning rate of stage 2 (the spurious split)")
        if which == "clip":
            s.add_argument("--p-full", type=float, default=0.5,
                           help="share of texts that are full captions (else one phrase)")
            s.add_argument("--phrase-weights", type=float, nargs=4, default=PHRASE_WEIGHTS,
                           metavar=("COLOR", "TEXTURE", "SHAPE", "BACKGROUND"),
                           help="how often each attribute's phrase is the text (normalised)")
            s.add_argument("--init", default=None,
                           help="start from these weights (an earlier run's .safetensors; its "
                                ".json record beside it is copied into the new record)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    (train_subject if args.which == "subject" else train_clip)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
