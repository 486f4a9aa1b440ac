"""An ordinary Avalanche training script, with IVON in place of Adam.

Compared with the usual ``Naive`` + Adam script only two lines change (marked
``# cl-bayes``): the optimizer and the strategy. Run it with

    python examples/avalanche_ivon.py --data-root ../shared/data [--limit 500]
"""

import argparse

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.models import SimpleMLP

from cl_bayes.avalanche import IVONStrategy  # cl-bayes
from cl_bayes.ivon import IVON  # cl-bayes

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=None)
parser.add_argument("--limit", type=int, default=None, help="training examples per experience (for a quick look)")
args = parser.parse_args()

torch.manual_seed(0)
benchmark = SplitMNIST(n_experiences=5, seed=0, dataset_root=args.data_root)
model = SimpleMLP(num_classes=10)
train_size = len(benchmark.train_stream[0].dataset) if args.limit is None else args.limit

# optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
optimizer = IVON(model.parameters(), lr=0.1, ess=train_size, hess_init=0.1)  # cl-bayes
# strategy = Naive(model=model, optimizer=optimizer, train_mb_size=128, eval_mb_size=1000)
strategy = IVONStrategy(model=model, optimizer=optimizer, train_mb_size=128, eval_mb_size=1000)  # cl-bayes

for experience in benchmark.train_stream:
    if args.limit is not None:
        experience.dataset = experience.dataset.subset(range(args.limit))
    strategy.train(experience)
    results = strategy.eval(benchmark.test_stream[: experience.current_experience + 1])

seen = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
last = results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp004"]
print(f"accuracy on the last experience: {last:.4f}; on all experiences seen: {seen:.4f}")
