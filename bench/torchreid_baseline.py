"""Reference number from elsewhere: torchreid's own softmax baseline on a Market-1501-format folder.

Benchmark-only tool; the project does not depend on torchreid and this file imports nothing from the
project (it only reads the folder). Run it with a separate venv that has torchreid (PyPI 0.2.5, which
packs KaiyangZhou/deep-person-reid as ``torchreid.reid``; its cython ranker is not shipped, so the
evaluation is torchreid's pure-python Market ranker, same numbers)::

    python3 -m venv ../tr-venv && ../tr-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        torchreid==0.2.5 scipy opencv-python-headless gdown tensorboard
    ../tr-venv/bin/python bench/torchreid_baseline.py --root DIR [--epochs 12 --height 64 --width 32]

The recipe is torchreid's configs/im_r50_softmax_256x128_amsgrad.yaml over scripts/default_config.py,
run through scripts/main.py, with these deliberate differences:

* from scratch (``pretrained=False``; no ImageNet weights here), so ``fixbase_epoch=0`` (the yaml's 5
  epochs of frozen-backbone warm-up only make sense for a pretrained backbone; default_config has 0);
* ``--arch`` (default resnet18, not resnet50_fc512) and ``--height/--width`` (default 64x32, not 256x128);
* budget: ``--epochs`` instead of 60, and the single_step scheduler's stepsize (20 of 60 epochs, i.e. a
  StepLR that multiplies the lr by 0.1 every 20 epochs) scaled to the budget: stepsize =
  max(1, round(lr_step * epochs)) with ``--lr-step`` default 1/3, e.g. 12 epochs -> x0.1 after 4 and 8;
* eval only after the last epoch (default_config's eval_freq=-1; the yaml's eval_freq=10 is monitoring
  only and would shift the RNG stream), CPU, one torch thread, 0 loader workers (to compare with the
  project's one-core trials).

Unchanged: amsgrad, lr 3e-4, weight decay 5e-4, betas (0.9, 0.999), batch 32 (RandomSampler, last
partial batch dropped), label-smoothed cross entropy (eps 0.1), train transforms = resize + random_flip,
ImageNet mean/std, test batch 100, euclidean distance on unnormalised features, Market protocol
(torchreid drops pid -1 junk everywhere; pid 0 distractors stay in the gallery; same-pid same-camera
gallery entries are ignored per query). Seeds via torchreid.utils.set_random_seed.

Output (stdout): ``seed S rank-1 X mAP Y seconds T`` per seed (percent; T = whole seed wall time), then
one JSON line with the per-seed results, mean and std (population std). torchreid's own log goes to
stderr.
"""

from __future__ import annotations

import os
import sys

# Isolation: nothing from this project (bench/ holds data.py, train.py, ... that could shadow imports).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torchreid  # noqa: E402

DATASET_NAME = "market_format_folder"


class MarketFormatFolder(torchreid.data.ImageDataset):
    """``root`` itself holds bounding_box_train/, query/, bounding_box_test/ (parsed as torchreid's Market1501)."""

    _junk_pids = [0, -1]

    def __init__(self, root="", **kwargs):
        self.root = os.path.abspath(os.path.expanduser(root))
        dirs = [os.path.join(self.root, d) for d in ("bounding_box_train", "query", "bounding_box_test")]
        self.check_before_run([self.root] + dirs)
        train, query, gallery = (self.process_dir(dirs[0], relabel=True), self.process_dir(dirs[1]),
                                 self.process_dir(dirs[2]))
        super().__init__(train, query, gallery, **kwargs)

    @staticmethod
    def process_dir(dir_path, relabel=False):
        pattern = re.compile(r"([-\d]+)_c(\d+)")
        items = []
        for path in sorted(glob.glob(os.path.join(dir_path, "*.jpg"))):
            pid, camid = map(int, pattern.search(os.path.basename(path)).groups())
            if pid == -1:
                continue  # junk images are ignored, as in torchreid's Market1501
            items.append((path, pid, camid - 1))  # camids 0-based
        if relabel:
            pid2label = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in items}))}
            items = [(path, pid2label[pid], camid) for path, pid, camid in items]
        return items


class RecordingEngine(torchreid.engine.ImageSoftmaxEngine):
    """torchreid's softmax engine, unchanged, that also keeps the epoch times and (rank-1, mAP)."""

    epoch_seconds: list
    result = None

    def train(self, *args, **kwargs):
        start = time.perf_counter()
        super().train(*args, **kwargs)
        self.epoch_seconds.append(time.perf_counter() - start)

    def _evaluate(self, *args, **kwargs):
        self.result = super()._evaluate(*args, **kwargs)
        return self.result


def run_seed(args, seed, save_dir):
    torchreid.utils.set_random_seed(seed)
    dm = torchreid.data.ImageDataManager(
        root=args.root, sources=DATASET_NAME, targets=DATASET_NAME, height=args.height, width=args.width,
        transforms=["random_flip"], norm_mean=[0.485, 0.456, 0.406], norm_std=[0.229, 0.224, 0.225],
        use_gpu=False, batch_size_train=args.batch_size, batch_size_test=100, workers=0,
        train_sampler="RandomSampler")
    model = torchreid.models.build_model(name=args.arch, num_classes=dm.num_train_pids, loss="softmax",
                                         pretrained=False, use_gpu=False)
    optimizer = torchreid.optim.build_optimizer(model, optim="amsgrad", lr=0.0003, weight_decay=5e-4,
                                                adam_beta1=0.9, adam_beta2=0.999, staged_lr=False)
    stepsize = max(1, round(args.lr_step * args.epochs))
    scheduler = torchreid.optim.build_lr_scheduler(optimizer, lr_scheduler="single_step",
                                                   stepsize=stepsize, gamma=0.1)
    engine = RecordingEngine(dm, model, optimizer=optimizer, scheduler=scheduler, use_gpu=False,
                             label_smooth=True)
    engine.epoch_seconds = []
    engine.run(save_dir=save_dir, max_epoch=args.epochs, start_epoch=0, print_freq=20, fixbase_epoch=0,
               open_layers=["classifier"], start_eval=0, eval_freq=-1, test_only=False,
               dist_metric="euclidean", normalize_feature=False, visrank=False, use_metric_cuhk03=False,
               ranks=[1, 5, 10, 20], rerank=False)
    rank1, mAP = engine.result
    return {"seed": seed, "rank1": round(100.0 * float(rank1), 4), "mAP": round(100.0 * float(mAP), 4),
            "stepsize": stepsize,
            "epoch_seconds": [round(s, 2) for s in engine.epoch_seconds]}


def _summary(values):
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", required=True, help="Market-1501-format folder")
    p.add_argument("--arch", default="resnet18", help="torchreid model name")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr-step", type=float, default=20 / 60,
                   help="single_step stepsize as a fraction of --epochs (torchreid: 20 of 60)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torchreid.data.register_image_dataset(DATASET_NAME, MarketFormatFolder)
    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="torchreid_baseline_") as save_dir, \
                contextlib.redirect_stdout(sys.stderr):
            res = run_seed(args, seed, save_dir)
        res["seconds"] = round(time.perf_counter() - start, 1)
        results.append(res)
        print(f"seed {seed} rank-1 {res['rank1']:.2f} mAP {res['mAP']:.2f} seconds {res['seconds']:.1f}",
              flush=True)
    print(json.dumps({
        "tool": "torchreid_baseline", "torchreid": torchreid.__version__, "torch": torch.__version__,
        "root": os.path.abspath(args.root), "arch": args.arch, "size": [args.height, args.width],
        "epochs": args.epochs, "batch_size": args.batch_size, "lr_step": args.lr_step, "results": results,
        "rank1": _summary([r["rank1"] for r in results]), "mAP": _summary([r["mAP"] for r in results]),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
