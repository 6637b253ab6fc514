"""Self-critical sequence training: exact sampling and log-probabilities, the CIDEr rising from a
cross-entropy start, exact resume and torchrun equality."""
from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.decoding.search import as_tokens, draw
from captioner.models.show_tell import ShowTell
from captioner.data.batches import Batch
from captioner.objectives.scst import reference_ids
from captioner.training.trainer import train
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID
from conftest import TINY, compose_config
from test_resume import assert_same_state, rows
from trainrun import load, one_thread, run, start, wait_for_step  # noqa: F401 (fixture)

V, D = 30, 10
# The offline Lite0 weights (random ones leave nothing in the features to caption from) and more
# images than TINY: cross-entropy reaches val CIDEr about 1.0 in 5 epochs (best.pt, picked on
# BLEU-4), SCST lifts it by about 0.2 in 10 epochs of 13 steps; 200 val images keep the noise of
# greedy captions below that.
DATA = [*TINY, "encoder.pretrained=true", "data.num_train=400", "data.num_val=200", "data.image_size=96",
        "model.embed_dim=64", "model.hidden_dim=128", "train.batch_size=32", "train.plot=false"]
SCST = ["objective=scst", "train.monitor=CIDEr", "optim.lr=5e-4", "optim.schedule=constant", "optim.warmup_steps=0",
        "objective.samples=4"]


def test_drawn_captions_depend_on_their_seed_only_and_score_as_teacher_forcing():
    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0).eval()
    features = torch.randn(6, D)
    uniforms = torch.rand(6, 9, generator=torch.Generator().manual_seed(1))
    out = draw(model, features, uniforms, max_length=8)
    alone = draw(model, features[2:3], uniforms[2:3], max_length=8)  # another batch layout, same randomness
    assert alone.sequences[0] == out.sequences[2]
    assert all(len(s) <= 8 for s in out.sequences) and len(set(map(tuple, out.sequences))) > 1
    # the teacher-forced log-probability of each drawn caption is what the step-by-step draw scored
    logprobs = model.sequence_logprobs(features, as_tokens(out.sequences, "cpu"))
    torch.testing.assert_close(logprobs, torch.tensor(out.scores), rtol=0, atol=1e-5)


def test_a_sampling_temperature_is_the_distribution_sampled_and_scored():
    """At temperature T, draw samples from softmax(logits / T) and sequence_logprobs scores under
    it: the per-token inverse-CDF choice, replayed by hand, picks the same words."""
    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0).eval()
    features, uniforms = torch.randn(4, D), torch.rand(4, 9, generator=torch.Generator().manual_seed(2))
    cold = draw(model, features, uniforms, max_length=8, temperature=0.5)
    tokens = as_tokens(cold.sequences, "cpu")
    with torch.no_grad():
        logits = model(features, tokens)  # [B, T-1, V]
    by_hand = []
    for b, seq in enumerate(cold.sequences):
        probs = (logits[b] / 0.5).softmax(-1)
        by_hand.append(sum(float(probs[t, w].log()) for t, w in enumerate([*seq, EOS_ID])))
    got = model.sequence_logprobs(features, tokens, temperature=0.5)
    torch.testing.assert_close(got, torch.tensor(by_hand), rtol=0, atol=1e-4)
    for b, seq in enumerate(cold.sequences):  # each word is where uniforms[b, t] falls in the tempered CDF
        for t, w in enumerate(seq):
            probs = (logits[b, t] / 0.5).softmax(-1)
            probs[[PAD_ID, BOS_ID]] = 0.0  # never emitted
            cdf = probs.cumsum(-1)
            assert int(torch.searchsorted(cdf, uniforms[b, t] * cdf[-1])) == w


def test_a_sampled_unk_earns_nothing_from_rare_reference_words():
    """References keep their rare words as ids of their own: <unk> in a sample matches nothing,
    as the word "<unk>" matches nothing when captions are scored as text."""
    from captioner.data import ImageRecord
    from captioner.objectives.rewards import CiderD
    from captioner.data.vocab import UNK_ID, Vocabulary

    vocab = Vocabulary.build(["a dog runs on grass", "a dog runs", "a cat sits on grass"], min_count=2)
    records = [ImageRecord(0, "a.jpg", ["a zebu runs on grass", "a gnu runs on grass"]),
               ImageRecord(1, "b.jpg", ["a dog sits on grass"])]
    refs = reference_ids(vocab, records)
    zebu, gnu = refs[0][0][1], refs[0][1][1]
    assert UNK_ID not in {t for caps in refs.values() for c in caps for t in c}
    assert len(vocab) <= zebu != gnu and refs[0][0][2:] == refs[0][1][2:] == [vocab.stoi[w] for w in "runs on grass".split()]
    cider = CiderD(refs)
    with_unk = [vocab.stoi["a"], UNK_ID, *refs[0][0][2:]]
    with_dog = [vocab.stoi["a"], vocab.stoi["dog"], *refs[0][0][2:]]  # "dog": in no reference of image 0
    with_zebu = [vocab.stoi["a"], zebu, *refs[0][0][2:]]
    unk, dog, exact = cider.score([0, 0, 0], [with_unk, with_dog, with_zebu])
    assert unk == pytest.approx(dog) and exact > unk


def _objective(samples=3, **options):
    """SCST on two images with hand-written references, and a small random model."""
    from omegaconf import OmegaConf

    from captioner.data import ImageRecord
    from captioner.data.vocab import Vocabulary
    from captioner.objectives.scst import ScstConfig, SelfCritical

    records = [ImageRecord(i, f"{i}.png", [f"a {c} square on the left", f"the {c} square"])
               for i, c in enumerate(["red", "blue"])]
    vocab = Vocabulary.build([c for r in records for c in r.captions], min_count=1)
    objective = SelfCritical(OmegaConf.structured(ScstConfig(samples=samples, **options)), vocab, records,
                             compose_config("train", ["decode.max_length=6"]).decode)
    torch.manual_seed(0)
    model = ShowTell(len(vocab), D, embed_dim=8, hidden_dim=12, dropout=0.5)
    batch = Batch(torch.randn(2, D), torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([5, 6]))
    return objective, model, batch, vocab


def test_the_mean_baseline_is_the_mean_of_the_same_images_other_samples():
    from captioner.objectives.scst import mean_of_others

    reward = np.array([[1.0, 2.0, 3.0], [10.0, 0.0, 5.0]])
    np.testing.assert_array_equal(mean_of_others(reward), [[2.5, 2.0, 1.5], [2.5, 7.5, 5.0]])


def test_samples_are_grouped_by_their_own_image(monkeypatch):
    """Each image's samples tie (1 for image 0's, 5 for image 1's): every advantage is 0, so the
    loss and its gradient are exactly 0. A batch-wide baseline, or samples grouped across
    images, would give +-2 advantages."""
    objective, model, batch, _ = _objective()
    by_image = {0: 1.0, 1: 5.0}
    monkeypatch.setattr(objective, "rewards", lambda ids, caps: np.array([by_image[i] for i in ids]))
    out = objective(model, batch)
    assert out.weight == 6 and out.figures["reward"] == 3.0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_samples_reach_the_reward_without_eos_and_cider_counts_the_vocabularys_eos(monkeypatch):
    objective, model, batch, _ = _objective()
    assert objective.cider.include_eos and objective.cider.eos == EOS_ID
    seen = []
    real = objective.rewards
    monkeypatch.setattr(objective, "rewards", lambda ids, caps: seen.extend(caps) or real(ids, caps))
    objective(model, batch)
    assert len(seen) == 6 and not any(EOS_ID in c or PAD_ID in c or BOS_ID in c for c in seen)
    plain, _, _, _ = _objective(include_eos=False)
    assert not plain.cider.include_eos


def test_the_reward_weights_cider_and_bleu():
    """cider_weight x CIDEr-D + bleu_weight x the toolkit's per-caption BLEU-4."""
    from captioner.objectives.rewards import bleu4

    cider_only, _, _, vocab = _objective()
    both, _, _, _ = _objective(cider_weight=1.0, bleu_weight=0.5)
    bleu_only, _, _, _ = _objective(cider_weight=0.0, bleu_weight=1.0)
    exact = [vocab.stoi[w] for w in "a red square on the left".split()]
    partial = [vocab.stoi[w] for w in "a blue square on the".split()]
    ids, captions = [0, 0], [exact, partial]
    assert bleu_only.cider is None
    np.testing.assert_allclose(bleu_only.rewards(ids, captions), bleu4([both.references[0]] * 2, captions))
    assert bleu_only.rewards(ids, captions)[0] == pytest.approx(1.0)  # a reference itself
    np.testing.assert_allclose(both.rewards(ids, captions),
                               cider_only.rewards(ids, captions) + 0.5 * bleu_only.rewards(ids, captions))


def test_the_greedy_baseline_decodes_without_dropout(monkeypatch):
    """With objective.dropout=true the samples see dropout, the baseline must not: the captions it
    is computed from are the eval-mode greedy ones, however the dropout masks fall."""
    from captioner.decoding.search import greedy

    objective, model, batch, _ = _objective(baseline="greedy", dropout=True)
    with torch.no_grad():
        expected = greedy(model.eval(), batch.features, max_length=6, ban_unk=False, block_trigrams=False).sequences
    baseline_captions = []
    real = objective.rewards
    monkeypatch.setattr(objective, "rewards", lambda ids, caps: (baseline_captions.append(caps) if len(caps) == 2
                                                                 else None) or real(ids, caps))
    model.train()
    for seed in range(4):
        torch.manual_seed(seed)  # other dropout masks
        objective(model, batch)
    assert baseline_captions == [expected] * 4
    assert model.training  # the caller's mode is restored


def test_samples_are_scored_under_the_distribution_they_were_drawn_from():
    """draw never emits <pad> or <bos> (nor <unk> with ban_unk) and closes a full caption with
    <eos>; sequence_logprobs with the same max_length leaves those tokens out and renormalizes,
    so it equals the log of the probabilities each step really drew with, replayed by hand."""
    from captioner.data.vocab import UNK_ID

    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0).eval()
    features, uniforms = torch.randn(8, D), torch.rand(8, 5, generator=torch.Generator().manual_seed(3))
    out = draw(model, features, uniforms, max_length=4, ban_unk=True, temperature=0.7)
    assert any(len(s) == 4 for s in out.sequences)  # some captions were closed by the length limit
    tokens = as_tokens(out.sequences, "cpu")
    by_hand = []
    with torch.no_grad():
        logits = model(features, tokens)
    for b, seq in enumerate(out.sequences):
        total = 0.0
        for t, w in enumerate([*seq, EOS_ID]):
            allowed = torch.ones(V, dtype=torch.bool)
            allowed[[PAD_ID, BOS_ID, UNK_ID]] = False
            if t == 4:
                allowed[:] = False
                allowed[EOS_ID] = True
            probs = (logits[b, t] / 0.7).exp() * allowed
            total += float((probs[w] / probs.sum()).log())
        by_hand.append(total)
    got = model.sequence_logprobs(features, tokens, temperature=0.7, max_length=4, ban_unk=True)
    torch.testing.assert_close(got, torch.tensor(by_hand), rtol=0, atol=1e-5)
    unrestricted = model.sequence_logprobs(features, tokens, temperature=0.7)
    assert bool((got > unrestricted).all())  # renormalized over fewer tokens: every caption more likely


@pytest.fixture(scope="module")
def scst_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes120")


@pytest.fixture(scope="module")
def cross_entropy_run(tmp_path_factory, scst_root):
    """A small cross-entropy run on the shapes set: SCST starts from its best.pt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("xe") / "run"
        final = train(compose_config("train", [*DATA, f"data.root={scst_root}", f"train.out_dir={out}",
                                               "train.epochs=5"]))
    finally:
        torch.set_num_threads(threads)
    return out / "best.pt", final


def test_scst_from_a_cross_entropy_checkpoint_raises_val_cider(cross_entropy_run, tmp_path, scst_root, one_thread):
    best, before = cross_entropy_run
    final = train(compose_config("train", [*DATA, f"data.root={scst_root}", f"train.out_dir={tmp_path / 'scst'}",
                                           *SCST, f"train.init_from={best}", "train.epochs=10"]))
    history = rows(tmp_path / "scst")
    start_cider = load(best)["metrics"]["val/CIDEr"]  # what best.pt scored (picked on BLEU-4)
    late = [r["val/CIDEr"] for r in history[-3:]]  # the run's end, not its luckiest epoch
    assert sum(late) / 3 > start_cider + 0.1, (start_cider, [r["val/CIDEr"] for r in history])
    assert final["best/CIDEr"] == max(r["val/CIDEr"] for r in history)
    rewards = [r["train/reward"] for r in history]
    assert rewards[-1] > rewards[0] + 0.1, rewards  # the sampled captions' mean CIDEr-D rises
    assert {"train/reward", "train/baseline", "train/sample_length"} <= set(history[0])
    assert load(tmp_path / "scst" / "best.pt")["vocab"] == load(best)["vocab"]


@pytest.mark.slow
def test_scst_killed_at_a_random_step_resumes_bitwise(cross_entropy_run, tmp_path, scst_root, one_thread):
    best, _ = cross_entropy_run
    overrides = [*DATA[len(TINY):], *SCST, f"train.init_from={best}", "train.epochs=2", "train.log_every=1",
                 "model.dropout=0.3", "objective.dropout=true"]
    train(compose_config("train", [*TINY, f"data.root={scst_root}", f"train.out_dir={tmp_path / 'ref'}",
                                   *overrides]))
    proc = start(scst_root, tmp_path / "run", *overrides, "train.save_every=1")
    wait_for_step(proc, random.Random(13).randint(2, 24))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    resumed = run(scst_root, tmp_path / "run", *overrides, "train.save_every=1", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt"))
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")


@pytest.mark.slow
def test_scst_under_torchrun_equals_one_process(cross_entropy_run, tmp_path, scst_root, one_thread):
    from test_distributed import torchrun

    best, _ = cross_entropy_run
    # 400 images in global batches of 47: shards of 24 + 23 images, and a last batch of 24
    overrides = [*DATA[len(TINY):], *SCST, f"train.init_from={best}", "train.epochs=1", "train.batch_size=47"]
    train(compose_config("train", [*TINY, f"data.root={scst_root}", f"train.out_dir={tmp_path / 'ref'}",
                                   *overrides]))
    proc = torchrun(scst_root, tmp_path / "run", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt")
    assert got["world_size"] == 2 and got["step"] == ref["step"]
    for name, tensor in ref["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_init_from_a_checkpoint_of_another_encoder_is_one_line(tmp_path, shapes_root):
    from test_commands import checkpoint_for
    from trainrun import assert_one_line_error

    other = checkpoint_for(tmp_path / "resnet.pt", "encoder=resnet50", "encoder.pretrained=false")
    proc = run(shapes_root, tmp_path / "run", "objective=scst", f"train.init_from={other}")
    assert_one_line_error(proc, f"{other} was trained on 2048-d features (encoder=resnet50)", "use the same encoder")
