"""``cl-bayes whatif --merge``: the merge of one run's posteriors previews a retrained ivon-merge exactly.

Tiny setting: ivon-merge on permuted-mnist, 300 training and 100 test examples per
experience, 2 epochs, one hidden layer of 32 units, 4 experiences.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from cl_bayes import whatif as W
from cl_bayes import whatif_merge as WM

TINY = ["train_per_experience=300", "test_per_experience=100", "epochs=2", "hidden=[32]", "experiences=4"]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cl-bayes")
    W.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["whatif", *argv])


@pytest.fixture
def tiny_args(tmp_path, mnist_root):
    def make(*extra: str) -> argparse.Namespace:
        sets = [a for s in TINY for a in ("--set", s)]
        return parse("--benchmark", "permuted-mnist", "--out", str(tmp_path), "--threads", "1",
                     "--data-root", str(mnist_root), *sets, *extra)

    return make


def test_parse_experiences():
    assert WM.parse_experiences("2,0") == [0, 2]
    for bad in ("", "a,1", "1,1", "-1", "0,4"):
        with pytest.raises(WM.MergePreviewError):
            WM.parse_experiences(bad, 4)


def test_preview_equals_the_retrained_merge(tiny_args, tmp_path, capsys):
    checkpoint = tmp_path / "posteriors.pt"
    args = tiny_args("--merge", "0,2", "--verify", "--checkpoint", str(checkpoint))
    assert args.func(args) == 0
    out = json.loads((tmp_path / "merge-0-2-seed0.json").read_text())
    assert out["strategy"] == "ivon-merge" and out["merged_experiences"] == [0, 2]
    assert (tmp_path / "merge-0-2-seed0.png").stat().st_size > 10_000
    pre, real = out["preview"]["accuracy"], out["real_merge"]["accuracy"]
    assert len(pre) == 4 and pre == pytest.approx(real, abs=1e-9)  # same draws per experience: the same merge
    assert out["difference"]["max_abs_merged"] < 1e-9
    assert max(pre[0], pre[2]) > 0.5  # the merged experiences are learnt (chance is 0.1)
    assert out["time_s"]["retrain"] > 0 and out["command"].startswith("cl-bayes whatif --benchmark permuted-mnist "
                                                                       "--merge 0,2")
    assert "preview" in capsys.readouterr().out
    # another subset from the saved posteriors, no training: the merge of the checkpoint's posteriors
    other = tiny_args("--merge", "1,2,3", "--checkpoint", str(checkpoint))
    assert other.func(other) == 0
    second = json.loads((tmp_path / "merge-1-2-3-seed0.json").read_text())
    assert second["posteriors_loaded_from_checkpoint"] and "real_merge" not in second
    state = torch.load(checkpoint, weights_only=False)
    assert state["experiences"] == [0, 1, 2, 3] and len(state["means"]) == 4


def test_merge_errors(tiny_args):
    with pytest.raises(ValueError, match="ivon-merge"):
        args = tiny_args("--merge", "0,1", "--strategy", "ivon-prior")
        args.func(args)
    with pytest.raises(ValueError, match="out of range"):
        args = tiny_args("--merge", "0,7")
        args.func(args)
