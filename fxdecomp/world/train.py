"""Train the world's two tiny models on CPU and write their weights + records into the package.

    python -m fxdecomp.world.train subject [--n 2048 --pretrain-epochs 40 --epochs 4 --seed 0
                                            --pretrain-recon W --pretrain-simclr W --init PATH]
    python -m fxdecomp.world.train clip    [--n 12000 --epochs 8 --seed 0 --aux-ce W --fresh
                                            --init PATH]

subject: a conv-stem timm ViT (``SUBJECT_STEM``, ``SUBJECT_CONFIG``) trained in two stages, as
Waterbirds models are (generic pretraining, then the task):

1. pretraining stand-in over the unbiased ``train`` split, ``--pretrain-epochs`` of: cross-entropy
   on the **8-way shape** label (``--pretrain-label shape``; the label family the task's binary
   label derives from) with an 8-way head, plus two self-supervised losses that no label enters
   (a generically pretrained backbone keeps what images look like): ``--pretrain-recon`` x the
   squared error of a linear decoder from the pre-logits to the image pooled to 8 x 8
   (``RECON_GRID``), and ``--pretrain-simclr`` x SimCLR's loss (``nt_xent``) between two random
   crops of each image (``SIMCLR_SCALE``, flips, colors never changed); optionally
   ``--pretrain-grad`` x the squared error of a zero-initialised linear decoder from the
   pre-logits to the image's gradient energy (``_gradient_energy``: mean absolute pixel
   differences in four directions, pooled to ``--pretrain-grad-grid`` cells, each statistic
   standardised over the batch, or as it is with the error over its mean batch variance:
   ``--pretrain-grad-loss relative``), a texture-sensitive target from the pixels alone (the pooled
   copy averages the 4-10 pixel patterns away); ``--pretrain-recon-grid`` sets the pooled copy's
   grid;
2. the task: a new 2-way head and ``--epochs`` of cross-entropy on round vs angular over the
   ``spurious-train`` split (background agrees with the label in 95% of the images), peak
   learning rate ``--finetune-lr``.

Every epoch draws ``--n`` fresh images (seed ``seed * 1000 + epoch``, counting on over both
stages), so nothing is memorised. The subject is never told color, texture or background.
``--init`` continues from an earlier run's weights (its record is embedded in the new one).
(``--pretrain-label angular`` is an earlier recipe: the binary label in both stages; the model
then separates round from angular but not the 8 shapes. A ViT trained from scratch on the
spurious split alone learns only the background cue: balanced accuracy 0.50 after 10 epochs;
so does the self-supervised losses' model fine-tuned without shape, ``--pretrain-label none``:
0.52, worst group 0.00. Shape cross-entropy alone keeps little color: best single head 0.47
precision@10 for color, against 0.81 with the self-supervised losses.)
Evaluated on the balanced test split (accuracy and worst-group accuracy over the four label x
background-group groups); the record also holds stage 1's 8-way shape accuracy on ``test``.
The shipped subject is four runs, each continuing from the one before: ``subject --threads 1``
(4 heads, shape only, 40 + 4 epochs), ``subject --threads 1 --init <run 1> --pretrain-epochs
15 --pretrain-recon 2.0 --pretrain-simclr 1.0`` (4 heads), then the same with ``--init <run 2>
--pretrain-epochs 12`` and 8 heads (``SUBJECT_CONFIG``; a head count is not in the weights,
each 16-wide head of run 2 became two 8-wide heads), then ``--init <run 3> --pretrain-epochs 8
--pretrain-recon 2.0 --pretrain-simclr 1.0 --pretrain-grad 1.0 --pretrain-grad-grid 1
--pretrain-grad-loss relative`` (chosen among seven such fine-tunings on six world seeds: the
README's "The ground-truth world").

clip: the tiny CLIP (``CLIP_CONFIG``) trained contrastively on texts about the training images:
each image gets either its full caption or one attribute phrase ("red color", ...), at random.
The loss is a multi-positive InfoNCE: text j is a positive for image i whenever every attribute
the text names has i's value (so "red color" is a positive for every red image in the batch).
``--aux-ce`` adds that weight x the cross-entropy of one linear probe per attribute on the unit
image embedding (the supervision the captions carry, given every step for every attribute);
``--fresh`` draws new images every epoch. Evaluated by zero-shot classification of each
attribute on the test split with ``attribute_prompts`` (one phrase per value, no template).
``--phrase-weights`` sets how often each attribute's phrase is the text; ``--init`` continues
from an earlier run's weights (its record is embedded in the new one). The shipped CLIP is five
runs, each continuing from the one before: ``clip --threads 1`` (8 epochs; zero-shot shape 0.15:
contrastive training on these texts learns color, texture and background long before shape),
``clip --threads 2 --init <run 1> --epochs 5 --p-full 0.2 --phrase-weights 0.1 0.1 0.7 0.1``
(shape 0.36), ``clip --threads 1 --init <run 2> --aux-ce 1.0 --fresh --n 4096 --epochs 15 --lr
1e-3`` (0.51), then twice ``clip --threads 1 --init <previous> --aux-ce 2.0 --fresh --n 4096
--epochs 30 --lr 1e-3`` (0.87, 0.98).

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
#: the subject's pretraining reconstructs the image average-pooled to this grid (``--pretrain-recon``)
RECON_GRID = 8
#: temperature of the tiny CLIP's auxiliary attribute probes (``--aux-ce``)
AUX_SCALE = 10.0
#: the cells of the subject's gradient-energy target (``--pretrain-grad``): RECON_GRID x RECON_GRID
GRAD_GRID = RECON_GRID
#: the pixel steps of the gradient-energy target: horizontal, vertical, diagonal, anti-diagonal
GRAD_STEPS = ((0, 1), (1, 0), (1, 1), (1, -1))
#: area range of the subject's instance-discrimination crops (``--pretrain-simclr``)
SIMCLR_SCALE = (0.5, 1.0)
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


def _downsampled(x: torch.Tensor, grid: int = RECON_GRID) -> torch.Tensor:
    """The reconstruction target of the subject's pretraining: the image average-pooled to
    ``grid`` x ``grid`` cells (``--pretrain-recon-grid``, default ``RECON_GRID``), flattened
    [B, 3 * grid ** 2]."""
    return F.adaptive_avg_pool2d(x, grid).flatten(1)


def _gradient_energy(x: torch.Tensor, grid: int = GRAD_GRID) -> torch.Tensor:
    """The gradient-energy target of the subject's pretraining (``--pretrain-grad``), from the
    pixels alone: for each step (dy, dx) of ``GRAD_STEPS`` the absolute difference between each
    pixel and its neighbour at that step, averaged over the color channels and pooled to ``grid``
    x ``grid`` cells; flattened [B, len(GRAD_STEPS) * grid ** 2]. A pooled copy of the image
    averages fine patterns away; these statistics keep how much, and in which directions, the
    image varies inside each cell (what a pattern is)."""
    h, w = x.shape[-2:]
    maps = []
    for dy, dx in GRAD_STEPS:           # dy >= 0: pixel (i, j) against pixel (i + dy, j + dx)
        near = x[:, :, dy:, max(0, dx):w + min(0, dx)]
        here = x[:, :, :h - dy, max(0, -dx):w - max(0, dx)]
        d = (near - here).abs().mean(1, keepdim=True)
        maps.append(F.adaptive_avg_pool2d(d, grid))
    return torch.cat(maps, 1).flatten(1)


def _load_init(model, path: str | None) -> dict | None:
    """Load an earlier run's weights into ``model`` (``--init``); its record, read from the JSON
    beside the weights, goes into the new record."""
    if not path:
        return None
    from safetensors.torch import load_file
    model.load_state_dict(load_file(path))
    record = Path(path).with_suffix(".json")
    return {"weights": path, "record": json.loads(record.read_text()) if record.is_file() else None}


def _views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random view of every image (``SIMCLR_SCALE`` resized crop and a horizontal flip; no
    color change), the augmentation of the subject's instance-discrimination loss."""
    from torchvision.transforms.v2 import functional as TF
    size = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(len(x)):
        u = torch.rand(4, generator=g).tolist()
        side = max(8, round(size * math.sqrt(SIMCLR_SCALE[0] + u[0] * (SIMCLR_SCALE[1] - SIMCLR_SCALE[0]))))
        top, left = int(u[1] * (size - side + 1)), int(u[2] * (size - side + 1))
        v = TF.resized_crop(x[i], top, left, side, side, [size, size], antialias=True)
        out[i] = v.flip(-1) if u[3] < 0.5 else v
    return out


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's loss for two views' embeddings a, b [B, E]: view i of one side must pick view i
    of the other among the batch (both directions)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _fit_stage(model, args, split: str, label: str, epochs: int, lr: float, seed_offset: int,
               g: torch.Generator, t0: float, recon: torch.nn.Module | None = None,
               recon_weight: float = 0.0, simclr: torch.nn.Module | None = None,
               simclr_weight: float = 0.0, recon_grid: int = RECON_GRID,
               grad: torch.nn.Module | None = None, grad_weight: float = 0.0,
               grad_grid: int = GRAD_GRID, grad_loss: str = "standardised") -> None:
    """``epochs`` epochs of cross-entropy on ``label`` (its codes), a fresh draw of ``args.n``
    images of ``split`` every epoch (seed ``args.seed * 1000 + seed_offset + epoch``), AdamW with
    warmup and a cosine decay over the stage. With ``recon``: plus ``recon_weight`` x the mean
    squared error of ``recon(pre-logits)`` against the downsampled image (``_downsampled`` to
    ``recon_grid``). With ``grad``: plus ``grad_weight`` x the mean squared error of
    ``grad(pre-logits)`` against the image's gradient energy (``_gradient_energy`` pooled to
    ``grad_grid``), each statistic standardised over the batch (``grad_loss`` "standardised") or
    as it is with the error divided by its mean variance over the batch ("relative").
    With ``simclr`` (a projection head): plus ``simclr_weight`` x ``nt_xent`` of the projected
    pre-logits of two random views (``_views``) of the batch."""
    params = [p for m in (model, recon, simclr, grad) if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(args.n / args.batch)
    step = 0
    for epoch in range(epochs):
        data = generate(args.n, seed=args.seed * 1000 + seed_offset + epoch, split=split,
                        workers=args.workers)
        x = data.tensor()
        y = torch.from_numpy(data.codes(label)) if label != "none" else None
        model.train()
        perm = torch.randperm(len(x), generator=g)
        losses, recon_losses, simclr_losses, grad_losses = [], [], [], []
        for i in range(0, len(x), args.batch):
            idx = perm[i:i + args.batch]
            _schedule(opt, step, steps, lr, warmup=max(1, steps // 20))
            xb = x[idx].to(args.device)
            pre = model.forward_head(model.forward_features(xb), pre_logits=True)
            loss = (F.cross_entropy(model.head(pre), y[idx].to(args.device)) if y is not None
                    else pre.new_zeros(()))
            if recon is not None:
                r = F.mse_loss(recon(pre), _downsampled(xb, recon_grid))
                recon_losses.append(r.item())
                loss = loss + recon_weight * r
            if grad is not None and len(xb) > 1:
                t = _gradient_energy(xb, grad_grid)
                if grad_loss == "standardised":
                    # each statistic standardised over the batch: the loss is the share of its
                    # variance left unexplained (1 at the zero-initialised decoder's start)
                    t = (t - t.mean(0)) / t.std(0).clamp_min(1e-6)
                    r = F.mse_loss(grad(pre), t)
                else:   # "relative": the target as it is, the error over its mean batch variance
                    r = F.mse_loss(grad(pre), t) / t.var(0).mean().clamp_min(1e-6)
                grad_losses.append(r.item())
                loss = loss + grad_weight * r
            if simclr is not None:
                v1, v2 = _views(xb, g), _views(xb, g)
                z = simclr(model.forward_head(model.forward_features(torch.cat([v1, v2])),
                                              pre_logits=True))
                c = nt_xent(*z.chunk(2))
                simclr_losses.append(c.item())
                loss = loss + simclr_weight * c
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        extra = (f" recon {np.mean(recon_losses):.4f}" if recon_losses else "") + \
            (f" simclr {np.mean(simclr_losses):.4f}" if simclr_losses else "") + \
            (f" grad {np.mean(grad_losses):.4f}" if grad_losses else "")
        print(f"epoch {epoch + 1}/{epochs} ({split}, {label}) loss {np.mean(losses):.4f}{extra} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


def train_subject(args) -> dict:
    test = generate(args.eval_n, seed=EVAL_SEED, split="balanced-test", workers=args.workers)
    model = build_subject(args.seed)
    init = _load_init(model, args.init)
    model = model.to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    pretrain = {"split": "train", "label": args.pretrain_label, "epochs": args.pretrain_epochs,
                "lr": args.lr, "recon_weight": args.pretrain_recon,
                "recon_target": f"image average-pooled to {args.pretrain_recon_grid}x"
                                f"{args.pretrain_recon_grid}, linear decoder from the pre-logits",
                "simclr_weight": args.pretrain_simclr,
                "simclr_views": f"resized crop (area {SIMCLR_SCALE}) + horizontal flip, no color "
                                "change; temperature 0.2; MLP projection head"}
    if args.pretrain_grad:
        pretrain["grad_weight"] = args.pretrain_grad
        pretrain["grad_target"] = (
            f"mean absolute pixel difference at steps (dy, dx) {list(GRAD_STEPS)}, averaged over "
            f"the color channels and pooled to {args.pretrain_grad_grid}x{args.pretrain_grad_grid}; "
            "linear decoder (zero init) from the pre-logits; loss: " + (
                "squared error against each statistic standardised over the batch"
                if args.pretrain_grad_loss == "standardised" else
                "squared error against the target as it is, over its mean variance in the batch")
            + "; pixels only, no label or mask")
        pretrain["grad_loss"] = args.pretrain_grad_loss
    if args.pretrain_epochs and args.pretrain_label == "none" and not (
            args.pretrain_recon or args.pretrain_simclr or args.pretrain_grad):
        raise SystemExit("--pretrain-label none needs --pretrain-recon, --pretrain-grad or "
                         "--pretrain-simclr")
    if args.pretrain_epochs:
        # stage 1: the generic pretraining stand-in on the unbiased train split (every image
        # drawn afresh, so nothing is memorised); the label family the task's label derives from
        if args.pretrain_label == "shape":
            torch.manual_seed(args.seed + 1)
            model.reset_classifier(len(ATTRIBUTES["shape"]))
        recon = None
        if args.pretrain_recon:
            # self-supervised part of the pretraining stand-in: the pre-logits must keep what
            # the image looks like (a linear decoder to a coarse copy of it), as a generically
            # pretrained backbone does; no attribute label is involved
            torch.manual_seed(args.seed + 3)
            recon = torch.nn.Linear(SUBJECT_CONFIG["embed_dim"],
                                    3 * args.pretrain_recon_grid ** 2).to(args.device)
        grad = None
        if args.pretrain_grad:
            # texture-sensitive self-supervision: the pre-logits must also keep how the image
            # varies inside each cell (pooled gradient energy per direction), which the pooled
            # copy averages away; computed from the pixels, no label or mask
            torch.manual_seed(args.seed + 7)
            grad = torch.nn.Linear(SUBJECT_CONFIG["embed_dim"],
                                   len(GRAD_STEPS) * args.pretrain_grad_grid ** 2).to(args.device)
            # zero init: the loss starts at 1 (standardised target; relative: 1 + mean² /
            # variance) and its error reaches the backbone only as the decoder learns (a random
            # decoder against the raw statistics, error ~50x their variance, pulled the
            # pretrained backbone away from shape in a first try: 8-way accuracy 0.99 -> 0.38)
            torch.nn.init.zeros_(grad.weight)
            torch.nn.init.zeros_(grad.bias)
        simclr = None
        if args.pretrain_simclr:
            # instance discrimination between two crops of each image (SimCLR), the other
            # generic self-supervised part; colors are never jittered, so color stays useful
            torch.manual_seed(args.seed + 5)
            d = SUBJECT_CONFIG["embed_dim"]
            simclr = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(),
                                         torch.nn.Linear(d, d)).to(args.device)
        _fit_stage(model, args, "train", args.pretrain_label, args.pretrain_epochs, args.lr,
                   0, g, t0, recon=recon, recon_weight=args.pretrain_recon, simclr=simclr,
                   simclr_weight=args.pretrain_simclr, recon_grid=args.pretrain_recon_grid,
                   grad=grad, grad_weight=args.pretrain_grad, grad_grid=args.pretrain_grad_grid,
                   grad_loss=args.pretrain_grad_loss)
        held = generate(args.eval_n, seed=EVAL_SEED, split="test", workers=args.workers)
        if args.pretrain_label == "shape":
            pretrain["test_shape_accuracy"] = shape_accuracy(model, held)
        if args.pretrain_label in ("shape", "none"):
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
              "pretrain": pretrain, "init": init,
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
    init = _load_init(clip, args.init)
    clip = clip.to(args.device)
    phrase_weights = np.asarray(args.phrase_weights, float) / np.sum(args.phrase_weights)
    # --aux-ce: one linear probe per attribute on the unit image embedding (a cosine classifier
    # with temperature AUX_SCALE), cross-entropy on the attribute's value: the supervised signal
    # the captions carry, given every step for every attribute (shape is otherwise learned last)
    params = list(clip.parameters())
    if args.aux_ce:
        torch.manual_seed(args.seed + 4)
        probes = torch.nn.ModuleList(torch.nn.Linear(CLIP_CONFIG["embed_dim"], len(v), bias=False)
                                     for v in ATTRIBUTES.values()).to(args.device)
        params += list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    steps = args.epochs * (args.n // args.batch)
    step, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        if args.fresh and epoch:        # --fresh: a new draw of the train split every epoch
            data = generate(args.n, seed=args.seed * 1000 + epoch, split="train",
                            workers=args.workers)
        x = data.tensor()
        codes = torch.from_numpy(np.stack([data.codes(a) for a in ATTRIBUTES], 1))   # [N, 4]
        clip.train()
        perm = torch.randperm(len(x), generator=g)
        losses, aux_correct = [], []
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
            if args.aux_ce:
                c = c.to(args.device)
                logits = [AUX_SCALE * probe(img) for probe in probes]
                loss = loss + args.aux_ce * sum(F.cross_entropy(lg, c[:, a])
                                                for a, lg in enumerate(logits)) / len(logits)
                aux_correct.append([(lg.argmax(-1) == c[:, a]).float().mean().item()
                                    for a, lg in enumerate(logits)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        extra = (" probe accuracy " + " ".join(f"{a} {v:.3f}" for a, v in
                                               zip(ATTRIBUTES, np.mean(aux_correct, 0)))
                 if aux_correct else "")
        print(f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses):.4f}{extra} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    record = {"model": "clip", "config": CLIP_CONFIG, "train_split": "train", "train_n": args.n,
              "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "p_full": args.p_full,
              "aux_ce": args.aux_ce, "aux_scale": AUX_SCALE, "fresh_draw_per_epoch": args.fresh,
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
            s.add_argument("--pretrain-label", choices=("shape", "angular", "none"),
                           default="shape",
                           help="stage-1 label: the 8 shapes (then a new binary head), "
                                "round/angular itself, or none (self-supervised losses only)")
            s.add_argument("--finetune-lr", type=float, default=3e-4,
                           help="peak learning rate of stage 2 (the spurious split)")
            s.add_argument("--pretrain-recon", type=float, default=0.0,
                           help="weight of the stage-1 reconstruction loss (a linear decoder "
                                "from the pre-logits to the image pooled to 8x8); 0: none")
            s.add_argument("--pretrain-recon-grid", type=int, default=RECON_GRID,
                           help="cells per side of the reconstruction target (the image "
                                "average-pooled to this grid)")
            s.add_argument("--pretrain-grad", type=float, default=0.0,
                           help="weight of the stage-1 gradient-energy loss (a linear decoder "
                                "from the pre-logits to the mean absolute pixel differences in "
                                "four directions, pooled to --pretrain-grad-grid cells, each "
                                "standardised over the batch); 0: none")
            s.add_argument("--pretrain-grad-grid", type=int, default=GRAD_GRID,
                           help="cells per side of the gradient-energy target")
            s.add_argument("--pretrain-grad-loss", choices=("standardised", "relative"),
                           default="standardised",
                           help="standardised: each statistic standardised over the batch; "
                                "relative: the statistics as they are, the squared error over "
                                "their mean variance in the batch")
            s.add_argument("--pretrain-simclr", type=float, default=0.0,
                           help="weight of the stage-1 instance-discrimination loss between two "
                                "crops of each image (SimCLR, no color change); 0: none")
        s.add_argument("--init", default=None,
                       help="start from these weights (an earlier run's .safetensors; its "
                            ".json record beside it is copied into the new record)")
        if which == "clip":
            s.add_argument("--aux-ce", type=float, default=0.0,
                           help="weight of the auxiliary per-attribute probe cross-entropy")
            s.add_argument("--fresh", action="store_true",
                           help="draw --n new training images every epoch")
            s.add_argument("--p-full", type=float, default=0.5,
                           help="share of texts that are full captions (else one phrase)")
            s.add_argument("--phrase-weights", type=float, nargs=4, default=PHRASE_WEIGHTS,
                           metavar=("COLOR", "TEXTURE", "SHAPE", "BACKGROUND"),
                           help="how often each attribute's phrase is the text (normalised)")
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
