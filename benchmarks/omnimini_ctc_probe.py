#!/usr/bin/env python
"""Probe: can OmniMini's audio projector learn to read words from the cached Whisper tiny.en frames?

Trains a freshly initialised audio projector with CTC alone (no decoder) on 1200 of the 1300 spoken training
sentences, scoring every projected token against the decoder's embeddings of the training vocabulary plus one
blank direction (the same head as stage 1 of scripts/train_omnimini.py), and prints the greedy CTC word error rate on
60 training sentences, on the 100 held-out training sentences (same voices, unseen sentences) and on 24 sentences
of the evaluation split (evaluation voices). A projector that cannot reach a low held-out CTC WER cannot feed the
frozen decoder a transcript to copy. Needs the audio feature cache written by scripts/train_omnimini.py.

    OMP_NUM_THREADS=1 python benchmarks/omnimini_ctc_probe.py --steps 500
"""
import argparse
import hashlib
import json
import math
import time

import numpy as np
import torch

ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
ap.add_argument("--steps", type=int, default=500)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--save", default=None, help="write the trained projector state here")
args = ap.parse_args()
torch.set_num_threads(1)
STEPS, LR = args.steps, args.lr
BATCH = 16
from morphoquant.data.omnimini import EVAL_VOICES, Speech, alignment_data, asr_sentences
from morphoquant.eval.wer import word_error_rate
from morphoquant.zoo import cache_dir
from morphoquant.zoo.registry import omnimini_parts

t0 = time.time()
model, proc = omnimini_parts(projectors=None)
cfg = model.omni_config
tag = hashlib.sha256(json.dumps([cfg.to_json(), torch.__version__]).encode()).hexdigest()[:12]
store = torch.load(cache_dir() / "omnimini" / f"audio-{tag}.pt")
_, speech = alignment_data(0, 1300)
train, held = speech[:1200], speech[1200:]
print("loaded", time.time() - t0, len(store), flush=True)
ev = [Speech(s, *EVAL_VOICES[i % 6]) for i, s in enumerate(asr_sentences("evaluation", 24))]
evf = {}
for s in ev:
    with torch.no_grad():
        evf[s] = model.encode_audio(proc.log_mels(s.waveform())[None])[0]
print("eval feats", time.time() - t0, flush=True)
tok = proc.tokenizer
emb = model.language_model.get_input_embeddings().weight.detach()
tgt = {s: tok(" " + s.text).input_ids for s in speech}
vocab = sorted({t for s in speech for t in tgt[s]})
index = {t: i for i, t in enumerate(vocab)}
e_sub = emb[vocab]
e_norm = float(emb.norm(dim=-1).mean())
torch.manual_seed(0)
proj = model.audio_projector
for m in proj.modules():
    if isinstance(m, torch.nn.Linear):
        m.reset_parameters()
blank = torch.nn.Parameter(torch.zeros(emb.shape[1]))
params = [*proj.parameters(), blank]
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
g = torch.Generator().manual_seed(0)

def feats(s):
    return store[(s.text, s.voice, s.speed)].float() if s in tgt else evf[s]

def decode(items):
    hyps = []
    with torch.no_grad():
        for s in items:
            y = model.project_audio([feats(s)])[0]
            lg = torch.cat([y @ e_sub.T, (y @ blank)[:, None]], -1).argmax(-1).tolist()
            out, prev = [], None
            for t in lg:
                if t != prev and t != len(vocab):
                    out.append(vocab[t])
                prev = t
            hyps.append(tok.decode(out).strip())
    return hyps

win = []
for step in range(STEPS):
    lr = LR * min(1.0, (step + 1) / 50) * (0.05 + 0.475 * (1 + math.cos(math.pi * step / STEPS)))
    for grp in opt.param_groups:
        grp["lr"] = lr
    sb = torch.randint(len(train), (BATCH,), generator=g).tolist()
    outs = model.project_audio([feats(train[i]) for i in sb])
    lens = torch.tensor([o.shape[0] for o in outs])
    padded = torch.nn.utils.rnn.pad_sequence(outs)
    logits = torch.cat([padded @ e_sub.T, (padded @ blank)[..., None]], -1)
    targets = [torch.tensor([index[t] for t in tgt[train[i]]]) for i in sb]
    loss_ctc = torch.nn.functional.ctc_loss(logits.log_softmax(-1), torch.cat(targets), lens,
                                            torch.tensor([len(x) for x in targets]), blank=len(vocab),
                                            zero_infinity=True)
    norms = torch.cat(outs).norm(dim=-1) / e_norm
    loss = loss_ctc + 0.1 * ((norms - 1) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    win.append(float(loss_ctc.detach()))
    if (step + 1) % 250 == 0 or step == STEPS - 1:
        tr = train[:60]
        h_tr, h_ho, h_ev = decode(tr), decode(held), decode(ev)
        print(f"step {step + 1} {time.time() - t0:.0f}s ctc {np.mean(win):.3f} "
              f"WER train {word_error_rate([s.text for s in tr], h_tr):.3f} "
              f"held {word_error_rate([s.text for s in held], h_ho):.3f} "
              f"eval {word_error_rate([s.text for s in ev], h_ev):.3f}", flush=True)
        win = []
for s, h in list(zip(ev, decode(ev)))[:5]:
    print("REF", s.text, "\nHYP", h)
if args.save:
    torch.save({"proj": proj.state_dict(), "blank": blank.detach(), "vocab": vocab}, args.save)
