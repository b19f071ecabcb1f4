"""Train OmniMini's projectors (the only trained weights) on offline paired data; reproduces the packaged file.

    OMP_NUM_THREADS=2 python scripts/train_omnimini.py                      # writes the packaged weights + log
    OMP_NUM_THREADS=1 python scripts/train_omnimini.py --out /tmp/x.safetensors --n-image 20 --n-spoken 10 \
        --n-asr 20                                                          # a quick smoke run

Steps: (1) assemble the real frozen parts (SmolLM2-135M, DINOv2-S, Whisper tiny.en encoder) with freshly
initialised projectors (seed 0); (2) build the training documents (``morphoquant.data.omnimini.
training_examples``: easy-VQA train QA + captions, spoken easy-VQA train questions, Wikipedia calibration-split
sentences, espeak-ng voices); (3) compute and cache the tower features (pooled DINOv2 patches, Whisper encoder
frames) under ``<cache>/omnimini/``; (4) one epoch of AdamW on the projectors with cross-entropy on the target
tokens only, through the frozen decoder. Two threads by default (``--threads``), fixed seeds, fixed order: the
same command on the same torch build and thread count gives the same weights (35.5 min on this machine, idle).
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


def align(model, proc, args, images, speech, img_store, aud_store) -> dict:
    """Stage 1, without the decoder: make projected tokens look like the decoder's embeddings of what they show.

    The decoder's (tied) embedding matrix ``E`` restricted to the target tokens scores every projected token
    ``y``: ``logits = y E^T``. Images: ``-log mean_tokens p(colour) - log mean_tokens p(shape)`` (some of the 16
    tokens must read as the colour word, some as the shape word). Speech: CTC of the transcript tokens over the
    audio tokens, with one extra learnable blank direction. A penalty ``0.1 (|y| / |e| - 1)^2`` keeps token norms at
    the embeddings' mean norm ``|e|``. Returns the loss curve.
    """
    tok = proc.tokenizer
    cfg = model.omni_config
    emb = model.language_model.get_input_embeddings().weight.detach()
    img_t = [(str(p), tok(" " + c).input_ids[0], tok(" " + sh).input_ids[0]) for p, c, sh in images]
    sp_t = [((s.text, s.voice, s.speed), tok(" " + s.text).input_ids) for s in speech]
    vocab = sorted({t for _, c, sh in img_t for t in (c, sh)} | {t for _, ids in sp_t for t in ids})
    index = {t: i for i, t in enumerate(vocab)}
    e_sub = emb[vocab]
    e_norm = float(emb.norm(dim=-1).mean())
    blank = torch.nn.Parameter(torch.zeros(emb.shape[1]))
    params = [*model.image_projector.parameters(), *model.audio_projector.parameters(), blank]
    opt = torch.optim.AdamW(params, lr=args.align_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    curve, window, t = [], {"image": [], "ctc": [], "colour_acc": []}, time.time()
    log(f"stage 1: {args.align_steps} steps, {len(img_t)} images, {len(sp_t)} clips, {len(vocab)} target tokens")
    for step in range(args.align_steps):
        lr = args.align_lr * min(1.0, (step + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.align_steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        ib = torch.randint(len(img_t), (16,), generator=g).tolist()
        y = model.image_projector(torch.stack([img_store[img_t[i][0]].float() for i in ib]))     # [16, n, H]
        p = torch.softmax(y @ e_sub.T, -1).mean(1)                                               # [16, V']
        col = torch.tensor([index[img_t[i][1]] for i in ib])
        shp = torch.tensor([index[img_t[i][2]] for i in ib])
        rows = torch.arange(len(ib))
        loss_img = -(p[rows, col].clamp(min=1e-9).log() + p[rows, shp].clamp(min=1e-9).log()).mean()
        sb = torch.randint(len(sp_t), (8,), generator=g).tolist()
        outs = model.project_audio([aud_store[sp_t[i][0]].float() for i in sb])
        lens = torch.tensor([o.shape[0] for o in outs])
        padded = torch.nn.utils.rnn.pad_sequence(outs)                                           # [T, 8, H]
        logits = torch.cat([padded @ e_sub.T, (padded @ blank)[..., None]], -1)
        targets = [torch.tensor([index[t] for t in sp_t[i][1]]) for i in sb]
        loss_ctc = torch.nn.functional.ctc_loss(
            logits.log_softmax(-1), torch.cat(targets), lens, torch.tensor([len(x) for x in targets]),
            blank=len(vocab), zero_infinity=True)
        norms = torch.cat([y.reshape(-1, y.shape[-1]), torch.cat(outs)]).norm(dim=-1) / e_norm
        loss = loss_img + loss_ctc + 0.1 * ((norms - 1) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window["image"].append(float(loss_img.detach()))
        window["ctc"].append(float(loss_ctc.detach()))
        colours = sorted({c for _, c, _ in img_t})
        pc = p.detach()[:, [index[c] for c in colours]].argmax(-1)
        window["colour_acc"].append(float((torch.tensor(colours)[pc] == torch.tensor([img_t[i][1] for i in ib]))
                                          .float().mean()))
        if (step + 1) % 50 == 0 or step == args.align_steps - 1:
            entry = {"step": step + 1, "elapsed_s": round(time.time() - t, 1), "lr": lr,
                     **{k: round(float(np.mean(v)), 4) for k, v in window.items()}}
            curve.append(entry)
            window = {k: [] for k in window}
            log(f"stage 1 step {step + 1}: " + " ".join(f"{k}={v}" for k, v in entry.items() if k != "step"))
    del cfg
    return {"steps": args.align_steps, "seconds": round(time.time() - t, 1), "target_tokens": len(vocab),
            "curve": curve}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="projector file (default: the packaged one)")
    ap.add_argument("--log", default=None, help="training log JSON (default: next to --out)")
    ap.add_argument("--n-image", type=int, default=1800, help="stage 2: image documents (4 QA turns)")
    ap.add_argument("--n-spoken", type=int, default=1000, help="stage 2: spoken-QA documents (2 turns)")
    ap.add_argument("--n-asr", type=int, default=1000, help="stage 2: transcription documents")
    ap.add_argument("--align-images", type=int, default=750, help="stage 1: labelled training images")
    ap.add_argument("--align-sentences", type=int, default=1300, help="stage 1: spoken training sentences")
    ap.add_argument("--align-steps", type=int, default=400, help="stage 1 steps (0: skip stage 1)")
    ap.add_argument("--align-lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=50, help="steps between checkpoints of the weights")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from morphoquant.data.omnimini import alignment_data, training_examples
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
    align_images, align_speech = alignment_data(args.align_images, args.align_sentences) if args.align_steps \
        else ([], [])
    images = sorted({str(p) for e in examples for p in e.images} | {str(p) for p, _, _ in align_images})
    speech = sorted({s for e in examples for s in e.speech} | set(align_speech),
                    key=lambda s: (s.text, s.voice, s.speed))

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

    params = [p for n, p in model.named_parameters() if n.split(".")[0] in
              ("image_projector", "audio_projector", "extra_embeddings")]
    for p in params:
        p.requires_grad_(True)
    align_log = align(model, proc, args, align_images, align_speech, img_store, aud_store) \
        if args.align_steps else {}

    # ---- stage 2: token documents through the frozen decoder
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
        "tokens_per_second": round(tokens_done / train_s, 1), "curve": curve, "alignment": align_log,
        "trainable_parameters": sum(p.numel() for p in params),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    from morphoquant.utils.atomic import atomic_write_json
    atomic_write_json(log_path, report)
    log(f"wrote {out} and {log_path}; training {train_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
