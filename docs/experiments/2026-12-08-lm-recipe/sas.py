import sys, json
sys.path.insert(0, "/work/main")
from training.data import InteractionData
from training.tasks import holdout_sequences
from training.baselines import SASRec
from training.evaluate import ranking_metrics
data = InteractionData.load("../shared/data/amazon-industrial")
cut = holdout_sequences(data.train, data.valid)
rows = data.valid[:1500]
items = sorted({i for s in data.train.values() for i in s} | {r.target for r in data.valid})
max_len = min(50, max(len(s) for s in data.train.values()))
for dim in (64, 128):
    for dropout in (0.2, 0.5):
        import torch
        best = None
        model = SASRec(items, dim=dim, max_len=max_len, dropout=dropout)
        res = {}
        def check(e):
            if e % 5: return False
            r = model.rank_many([x.history for x in rows], 10)
            res[e] = ranking_metrics(r, [x.target for x in rows])
            model.net.train()
            b = max(res, key=lambda k: res[k]["NDCG@10"])
            return e - b >= 10
        model.fit(cut, 150, on_epoch=check)
        b = max(res, key=lambda k: res[k]["NDCG@10"])
        print(json.dumps({"dim": dim, "dropout": dropout, "epoch": b, "HR@10": round(res[b]["HR@10"],4), "NDCG@10": round(res[b]["NDCG@10"],4)}), flush=True)
