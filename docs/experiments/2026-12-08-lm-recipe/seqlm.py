"""Experiment: the LM trained like a sequential model, valid only (train cut before valid rows)."""
import argparse, json, math, random, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "/work/main")
from model_store import tokens
from model_store.bundle import load_bundle
from training.data import InteractionData
from training.tasks import Example, holdout_sequences
from training.sft import SFTConfig, train_sft
from training.backbone import ScratchConfig, build_scratch_model
from training.evaluate import ranking_metrics

p = argparse.ArgumentParser()
p.add_argument("--ids", default="/work/main/var/exp/ids")
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--epochs", type=float, default=30)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--wd", type=float, default=0.01)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--item_tokens", action="store_true")
p.add_argument("--window", type=int, default=10)
p.add_argument("--mode", default="seq")  # seq: one example per window; prefix: one per position (old)
p.add_argument("--rows", type=int, default=1500)
p.add_argument("--beams", type=int, default=20)
p.add_argument("--minutes", type=float, default=None)
p.add_argument("--text", type=float, default=0.0)  # weight of text->id task
p.add_argument("--eval_every", type=float, default=0)
p.add_argument("--beams2", type=int, default=0)
p.add_argument("--save", default="")
p.add_argument("--fusion", action="store_true")
args = p.parse_args()
print(vars(args), flush=True)
torch.manual_seed(0)
data = InteractionData.load("/work/shared/data/amazon-industrial" if Path("/work/shared").exists() else "../shared/data/amazon-industrial")
train = holdout_sequences(data.train, data.valid)
rows = data.valid[: args.rows]
bundle = load_bundle(args.ids)
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
if args.item_tokens:
    from tokenizers import AddedToken
    tok.add_tokens([AddedToken(f"<item_{i}>", normalized=False, special=False) for i in range(len(bundle.items))])

def spell(i):
    s = bundle.spelled_id(i)
    return s + f"<item_{i}>" if args.item_tokens else s

def spell_hist(h):
    return [spell(bundle.index_of[i]) for i in h if i in bundle.index_of]

examples = []
for seq in train.values():
    seq = [i for i in seq if i in bundle.index_of]
    if len(seq) < 2:
        continue
    W = args.window + 1
    if args.mode == "seq":
        # windows of W items covering every target once (each window's first item is context only)
        starts = list(range(0, max(1, len(seq) - 1), args.window))
        for s in starts:
            w = seq[s: s + W]
            if len(w) < 2:
                continue
            hist, tgt = w[:-1], w[-1]
            sp = spell_hist(hist)
            head, rest = tokens.direct_prompt_split(sp)
            examples.append(Example(head, rest + bundle.spelled_id(bundle.index_of[tgt]), "sequential"))
    else:
        for t in range(1, len(seq)):
            hist = seq[max(0, t - args.window): t]
            sp = spell_hist(hist)
            head, rest = tokens.direct_prompt_split(sp)
            examples.append(Example(head, rest + bundle.spelled_id(bundle.index_of[seq[t]]), "sequential"))
if args.text > 0:
    tx = [Example(tokens.text_to_id_prompt(tokens.item_text(it.title, it.brand, it.categories)),
                  bundle.spelled_id(i), "text_to_id") for i, it in enumerate(bundle.items)]
    random.Random(0).shuffle(tx)
    examples += tx[: int(len(tx) * args.text)]
print(f"{len(examples)} examples, vocab {len(tok)}", flush=True)
cfg = ScratchConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=max(1, args.heads // 2),
                    intermediate_size=int(args.hidden * 2.75))
model = build_scratch_model(cfg, tok)
print(f"params {sum(p.numel() for p in model.parameters())/1e6:.2f}M", flush=True)
if args.dropout > 0:
    drop = torch.nn.Dropout(args.dropout)
    m = model.model
    m.embed_tokens.register_forward_hook(lambda mod, i, o: drop(o))
    for layer in m.layers:
        layer.mlp.register_forward_hook(lambda mod, i, o: drop(o))
        layer.self_attn.o_proj.register_forward_hook(lambda mod, i, o: drop(o))

from service.engine.shared_prefix import make_decoder
def evaluate():
    model.eval()
    dec = make_decoder(model, tok, bundle.trie, tokens.id_token_ids(tok, bundle.id_format))
    ranked = []
    for s in range(0, len(rows), 32):
        chunk = rows[s: s + 32]
        prompts = [tokens.direct_prompt(spell_hist(r.history[-10:])) for r in chunk]
        res = dec.topk(prompts, [10] * len(chunk), [args.beams] * len(chunk))
        ranked += [[bundle.items[x.index].item_id for x in rr] for rr in res]
    return ranking_metrics(ranked, [r.target for r in rows])

t = time.perf_counter()
total = args.epochs
stats = train_sft(model, tok, examples, SFTConfig(epochs=args.epochs, batch_size=args.bs, lr=args.lr, weight_decay=args.wd,
                                                 max_minutes=args.minutes))
tt = time.perf_counter() - t
t = time.perf_counter()
m = evaluate()
if args.beams2:
    b0 = args.beams; args.beams = args.beams2; m2 = evaluate(); args.beams = b0
    print("beams", args.beams2, round(m2["HR@10"], 4), round(m2["NDCG@10"], 4), flush=True)
if args.fusion:
    from training.stages.prepare import fit_prior
    from training.config import load_config
    from training.evaluate import prior_biases, prior_rankings
    prior = fit_prior(bundle, train, data.valid, load_config("small").prior, print)  # train is the cut here
    tgt = [r.target for r in rows]
    pm = ranking_metrics(prior_rankings(bundle, prior, rows), tgt)
    print("prior alone", round(pm["HR@10"], 4), round(pm["NDCG@10"], 4), flush=True)
    dec = make_decoder(model, tok, bundle.trie, tokens.id_token_ids(tok, bundle.id_format))
    for w in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        pr = prior.with_settings(mixture_weight=w, fusion="mixture")
        ranked = []
        for s0 in range(0, len(rows), 32):
            chunk = rows[s0: s0 + 32]
            prompts = [tokens.direct_prompt(spell_hist(r.history[-10:])) for r in chunk]
            res = dec.topk(prompts, [10] * len(chunk), [args.beams] * len(chunk), biases=prior_biases(bundle, pr, chunk))
            ranked += [[bundle.items[x.index].item_id for x in rr] for rr in res]
        fm = ranking_metrics(ranked, tgt)
        print("mixture", w, round(fm["HR@10"], 4), round(fm["NDCG@10"], 4), flush=True)
if args.save:
    model.save_pretrained(args.save); tok.save_pretrained(args.save)
print(json.dumps({"args": vars(args), "train_s": round(tt), "eval_s": round(time.perf_counter() - t), "steps": stats["steps"],
                  "loss": stats["final_loss"], "HR@10": round(m["HR@10"], 4), "NDCG@10": round(m["NDCG@10"], 4)}), flush=True)
with open("/work/main/var/exp/results.jsonl", "a") as fh:
    fh.write(json.dumps({"args": vars(args), "train_s": round(tt), "steps": stats["steps"], "loss": stats["final_loss"], **m}) + "\n")
