import math

import pytest
import torch
from torch import nn

from ensdiv.ensemble import Ensemble, mean_log_softmax
from ensdiv.errors import EnsdivError
from ensdiv.models import ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_stacked_equals_loop(arch, m):
    ens = Ensemble.build(arch, m, in_shape=(1, 12, 12), num_classes=5, seed=3)
    x = torch.rand(6, 1, 12, 12)
    loop = ens._member_logits(x, "loop")
    stacked = ens._member_logits(x, "stacked")
    assert loop.shape == (m, 6, 5)
    torch.testing.assert_close(stacked, loop, atol=2e-5, rtol=1e-5)


def test_stacked_gradients_equal_loop():
    ens = Ensemble.build("cnn", 3, in_shape=(1, 8, 8), num_classes=4, seed=0)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 4, (5,))
    grads = {}
    for path in ("loop", "stacked"):
        ens.zero_grad()
        out = ens._member_logits(x, path)
        nn.functional.cross_entropy(out.reshape(-1, 4), y.repeat(3)).backward()
        grads[path] = [p.grad.clone() for p in ens.parameters()]
    for a, b in zip(grads["loop"], grads["stacked"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_is_log_mean_softmax():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=1)
    x = torch.rand(7, 1, 8, 8)
    probs = torch.softmax(ens.member_logits(x), -1).mean(0)
    torch.testing.assert_close(ens(x).exp(), probs)
    assert torch.equal(ens.predict(x), probs.argmax(-1))
    # numerically stable for huge logits
    big = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])
    torch.testing.assert_close(mean_log_softmax(big), torch.full((1, 2), math.log(0.5)))


def test_class_decisions_refuse_pixels_outside_the_unit_range():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=1)
    x = torch.rand(4, 1, 8, 8)
    for decide in (ens.predict, ens.vote):
        with pytest.raises(EnsdivError, match=r"x must lie in \[0, 1\].*e\.g\. "):
            decide(x * 255)  # images never divided by 255
        with pytest.raises(EnsdivError, match=r"\[0, 1\]"):
            decide(x - 0.5)  # normalized outside the model
        decide(x)
    # the module interface takes noised inputs, as noise training and smoothing feed it
    assert torch.isfinite(ens(x + torch.randn_like(x))).all()


def test_vote_majority_and_tie_break():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.register_buffer("logits", torch.tensor(logits))

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    ens = Ensemble([Fixed([5.0, 0, 0]), Fixed([0, 1.0, 0]), Fixed([0, 1.0, 0])])
    assert ens.vote(torch.zeros(2, 1)).tolist() == [1, 1]  # 2 of 3 vote class 1
    assert ens.predict(torch.zeros(1, 1)).tolist() == [0]  # mean softmax prefers class 0
    tie = Ensemble([Fixed([5.0, 0, 0]), Fixed([0, 1.0, 0])])
    assert tie.vote(torch.zeros(1, 1)).tolist() == [0]  # tie -> higher mean softmax


def test_heterogeneous_uses_loop_and_refuses_stacked():
    members = [build_model("mlp", in_shape=(1, 8, 8), num_classes=10),
               build_model("cnn", in_shape=(1, 8, 8), num_classes=10)]
    ens = Ensemble(members)
    assert not ens.homogeneous
    x = torch.rand(2, 1, 8, 8)
    assert ens.resolve_path(x) == "loop"
    assert ens.member_logits(x).shape == (2, 2, 10)
    with pytest.raises(EnsdivError, match="one architecture"):
        Ensemble(members, path="stacked")
    with pytest.raises(EnsdivError, match="auto, loop, stacked"):
        Ensemble(members, path="fast")
    with pytest.raises(EnsdivError, match="at least 1"):
        Ensemble([])


def test_members_differ_and_build_is_seeded():
    a = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=3, seed=5)
    b = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=3, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    w0, w1 = (m.head.weight for m in a.members)
    assert not torch.equal(w0, w1)


def test_autotune_picks_a_path_and_leaves_grads():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3, path="auto")
    times = ens.autotune(torch.rand(4, 1, 8, 8), repeats=1)
    assert set(times) == {"loop", "stacked"} and all(t > 0 for t in times.values())
    assert ens._tuned["cpu"] in times
    assert all(p.grad is None for p in ens.parameters())


def test_save_load_roundtrip(tmp_path):
    ens = Ensemble.build("resnet20", 2, in_shape=(3, 8, 8), num_classes=4, seed=2,
                         mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], config={"lr": 0.1})
    ens.eval()
    x = torch.rand(5, 3, 8, 8)
    path = tmp_path / "e.pt"
    ens.save(path)
    loaded = Ensemble.load(path)
    assert torch.equal(loaded.member_logits(x), ens.member_logits(x))
    assert loaded.config == {"lr": 0.1}
    desc = loaded.description()
    assert desc["members"][0]["mean"] == pytest.approx([0.4, 0.5, 0.6])
    assert desc["version"] and desc["num_members"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(EnsdivError, match="no ensdiv ensemble file"):
        Ensemble.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(EnsdivError, match="not an ensdiv ensemble"):
        Ensemble.load(bad)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(EnsdivError, match="not a readable"):
        Ensemble.load(tmp_path / "junk.pt")
    with pytest.raises(EnsdivError, match="build_model"):
        Ensemble([nn.Linear(2, 2), nn.Linear(2, 2)]).save(tmp_path / "x.pt")


def test_heterogeneous_ensemble_saves_and_loads(tmp_path):
    from ensdiv.models import build_model

    members = [build_model("mlp", in_shape=(1, 8, 8), num_classes=10),
               build_model("cnn", in_shape=(1, 8, 8), num_classes=10, mean=[0.3], std=[0.4]),
               build_model("resnet20", in_shape=(1, 8, 8), num_classes=10)]
    ens = Ensemble(members).eval()
    assert ens.in_shape == (1, 8, 8) and ens.num_classes == 10
    ens.save(tmp_path / "h.pt")
    loaded = Ensemble.load(tmp_path / "h.pt")
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(loaded.member_logits(x), ens.member_logits(x))
    assert [m["arch"] for m in loaded.description()["members"]] == ["mlp", "cnn", "resnet20"]
    assert loaded.resolve_path(x) == "loop"


def test_members_must_agree_on_input_shape_and_classes():
    from ensdiv.models import build_model

    a = build_model("mlp", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match=r"different input shapes \[\(1, 8, 8\), \(1, 28, 28\)"):
        Ensemble([a, build_model("mlp", in_shape=(1, 28, 28), num_classes=10)])
    with pytest.raises(EnsdivError, match="different numbers of classes"):
        Ensemble([a, build_model("mlp", in_shape=(1, 8, 8), num_classes=4)])
    plain = Ensemble([nn.Linear(4, 3)])
    assert plain.in_shape is None and plain.num_classes is None


def test_load_refuses_a_checkpoint_and_rebuilds_advice(tmp_path):
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    run = tmp_path / "run"
    ens.save(run / "ensemble.pt")
    torch.save({"epoch": 1, "ensemble": ens.state_dict(), "optimizer": {}}, run / "checkpoint.pt")
    with pytest.raises(EnsdivError, match="not an ensdiv ensemble file"):
        Ensemble.load(run / "checkpoint.pt")
    (run / "ensemble.pt").write_bytes((run / "ensemble.pt").read_bytes()[:300])
    with pytest.raises(EnsdivError, match=f"checkpoint of the run in {run} by resuming") as e:
        Ensemble.load(run / "ensemble.pt")
    assert (e.value.remedy, e.value.folder) == ("retrain", str(run))  # the CLI names the command
    assert "ensdiv train" not in str(e.value)  # library errors name no command


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_loading_onto_a_gpu_this_machine_lacks_is_one_line(tmp_path):
    from ensdiv.errors import EnsdivError

    Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10).save(tmp_path / "e.pt")
    with pytest.raises(EnsdivError, match="no usable CUDA GPU; load with map_location='cpu'"):
        Ensemble.load(tmp_path / "e.pt", map_location="cuda")
