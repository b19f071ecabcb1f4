"""Train OmniMini's projectors (the only trained weights) on offline paired data; reproduces the packaged file.

    OMP_NUM_THREADS=1 python scripts/train_omnimini.py                      # writes the packaged weights + log
    OMP_NUM_THREADS=1 python scripts/train_omnimini.py --out /tmp/x.safetensors --n-image 20 --n-spoken 10 \
        --n-asr 20                                                          # a quick smoke run

Steps: (1) assemble the real frozen parts (SmolLM2-135M, DINOv2-S, Whisper tiny.en encoder) with freshly
initialised projectors (seed 0); (2) build the training documents (``morphoquant.data.omnimini.
training_examples``: easy-VQA train QA + captions, spoken easy-VQA train questions, Wikipedia calibration-split
sentences, espeak-ng voices); (3) compute and cache the tower features (pooled DINOv2 patches, Whisper encoder
frames) under ``<cache>/omnimini/``; (4) one epoch of AdamW on the projectors with cross-entropy on the target
tokens only, through the frozen decoder. One thread, fixed seeds, fixed order: the same command on the same
torch build gives the same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def feature_cache(kind: str, keys: list, compute, cache_root: Path, tag: str) -> dict:
    """``key -> fp16 tensor``, computed for missing keys and stored in one file per (kind, tag)."""
    path = cache_root / f"{kind}-{tag}.pt"
    store = torch.load(path) if path.is_file() else {}
    missing = [k for k in keys if k not in store]
    if missing:
        log(f"{kind}: computing {len(missing)} features ({len(store)} cached)")
        t = time.time()
        for i, out in enumerate(compute(missing)):
            store.update(out)
            if time.time() - t > 60 and i % 20 == 0:
                log(f"  {kind}: {len(store)}/{len(keys)}")
        tmp = path.with_suffix(".tmp")
        torch.save(store, tmp)
        os.replace(tmp, path)
        log(f"{kind}: done in {time.time() - t:.0f} s")
    return store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="projector file (default: the packaged one)")
    ap.add_argument("--log", default=None, help="training log JSON (default: next to --out)")
    ap.add_argument("--n-image", type=int, default=450)
    ap.add_argument("--n-spoken", type=int, default=300)
    ap.add_argument("--n-asr", type=int, default=800)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=50, help="steps between checkpoints of the weights")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from morphoquant.data.omnimini import training_examples
    from morphoquant.models.omnimini import ASSET_DIR, PROJECTOR_FILE, save_projectors
    from morphoquant.zoo import cache_dir
    from morphoquant.zoo.registry import omnimini_parts

    out = Path(args.out) if args.out else ASSET_DIR / PROJECTOR_FILE
    log_path = Path(args.log) if args.log else out.with_name(out.stem + "-training-log.json")
    t0 = time.time()
    model, proc = omnimini_parts(projectors=None)
    model.eval()
    cfg = model.omni_config
    log(f"parts loaded in {time.time() - t0:.1f} s")

    examples = training_examples(args.n_image, args.n_spoken, args.n_asr, seed=args.seed)
    kinds = sorted({e.kind for e in examples})
    log(f"{len(examples)} training documents: " + ", ".join(f"{k} {sum(e.kind == k for e in examples)}"
                                                            for k in kinds))

    # ---- tower features (frozen towers: computed once, cached)
    cache_root = cache_dir() / "omnimini"
    cache_root.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(json.dumps([cfg.to_json(), torch.__version__]).encode()).hexdigest()[:12]
    images = sorted({str(p) for e in examples for p in e.images})
    speech = sorted({s for e in examples for s in e.speech}, key=lambda s: (s.text, s.voice, s.speed))

    def image_batches(keys):
        from PIL import Image
        for i in range(0, len(keys), 16):
            chunk = keys[i:i + 16]
            px = proc.pixel_values([Image.open(k) for k in chunk])
            with torch.no_grad():
                feats = model.encode_images(px)
            yield {k: f.half().clone() for k, f in zip(chunk, feats)}

    def audio_items(keys):
        for s in keys:
            mel = proc.log_mels(s.waveform())
            with torch.no_grad():
                frames = model.encode_audio(mel[None])[0]
            yield {(s.text, s.voice, s.speed): frames.half().clone()}

    img_store = feature_cache("image", images, image_batches, cache_root, tag)
    aud_store = feature_cache("audio", [(s.text, s.voice, s.speed) for s in speech],
                              lambda keys: audio_items([type(speech[0])(*k) for k in keys]), cache_root, tag)

    # ---- token documents
    docs = []
    for e in examples:
        n_audio = [math.ceil(aud_store[(s.text, s.voice, s.speed)].shape[0] / cfg.audio_stack) for s in e.speech]
        ids, labels = [], []
        a = 0
        for text, target in e.segments:
            n_here = text.count(proc.AUDIO)
            seg = proc.text_ids(text, n_audio[a:a + n_here])
            a += n_here
            ids += seg
            labels += seg if target else [-100] * len(seg)
        docs.append({"kind": e.kind, "ids": ids, "labels": labels, "images": [str(p) for p in e.images],
                     "speech": [(s.text, s.voice, s.speed) for s in e.speech]})
    n_tok = sum(len(d["ids"]) for d in docs)
    log(f"{n_tok} tokens in {len(docs)} documents (mean {n_tok / len(docs):.1f})")

    # batches: length-sorted within windows of 64 documents (little padding), then the batch order shuffled
    rng = np.random.default_rng(args.seed)
    batches = []
    for w in range(0, len(docs), 64):
        window = sorted(range(w, min(w + 64, len(docs))), key=lambda i: len(docs[i]["ids"]))
        batches += [window[i:i + args.batch] for i in range(0, len(window), args.batch)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    steps = len(batches)

    params = [p for n, p in model.named_parameters() if n.split(".")[0] in
              ("image_projector", "audio_projector", "extra_embeddings")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    lm = model.language_model
    curve = []
    window_loss: dict[str, list[float]] = {k: [] for k in kinds}
    t_train = time.time()
    tokens_done = 0
    log(f"training: {steps} steps of {args.batch} documents, lr {args.lr}, {args.threads} thread(s)")
    for step, batch in enumerate(batches):
        bd = [docs[i] for i in batch]
        length = max(len(d["ids"]) for d in bd)
        ids = torch.full((len(bd), length), 0, dtype=torch.long)
        labels = torch.full((len(bd), length), -100, dtype=torch.long)
        mask = torch.zeros((len(bd), length), dtype=torch.long)
        for r, d in enumerate(bd):
            n = len(d["ids"])
            ids[r, :n] = torch.tensor(d["ids"])
            labels[r, :n] = torch.tensor(d["labels"])
            mask[r, :n] = 1
        img = [img_store[k].float() for d in bd for k in d["images"]]
        aud = [aud_store[k].float() for d in bd for k in d["speech"]]
        embeds = model.embed(ids, image_features=torch.stack(img) if img else None,
                             audio_features=aud if aud else None)
        hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = lm.lm_head(hidden[:, :-1][sel])
        tok_loss = torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="none")
        loss = tok_loss.mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens_done += int(mask.sum())
        # per-kind loss of this batch (token-weighted per document)
        row_of = sel.nonzero()[:, 0]
        for r, d in enumerate(bd):
            window_loss[d["kind"]].append(float(tok_loss.detach()[row_of == r].mean()))
        if (step + 1) % 10 == 0 or step == steps - 1:
            el = time.time() - t_train
            entry = {"step": step + 1, "elapsed_s": round(el, 1), "lr": lr_at(step), "grad_norm": float(gnorm),
                     "tokens": tokens_done, **{f"loss_{k}": round(float(np.mean(v)), 4)
                                               for k, v in window_loss.items() if v}}
            curve.append(entry)
            window_loss = {k: [] for k in kinds}
            log(f"step {step + 1}/{steps} {el / 60:.1f} min {tokens_done / el:.0f} tok/s " +
                " ".join(f"{k}={v}" for k, v in entry.items() if k.startswith("loss_")))
        if (step + 1) % args.save_every == 0 or step == steps - 1:
            meta = {"steps_done": step + 1, "steps_total": steps}
            save_projectors(model, out, metadata=meta)
    train_s = time.time() - t_train
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "args": vars(args), "config": json.loads(cfg.to_json()), "documents": len(docs), "tokens": n_tok,
        "kinds": {k: sum(d["kind"] == k for d in docs) for k in kinds}, "steps": steps,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "tokens_per_second": round(tokens_done / train_s, 1), "curve": curve,
        "trainable_parameters": sum(p.numel() for p in params),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    from morphoquant.utils.atomic import atomic_write_json
    atomic_write_json(log_path, report)
    log(f"wrote {out} and {log_path}; training {train_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
